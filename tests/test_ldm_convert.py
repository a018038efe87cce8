"""diffusers -> LDM export (utils/model/ldm_convert.py), checked against diffusers' own LDM -> diffusers loader.

Real tiny models, no mocks, no network: the exported single file is read back with
``StableDiffusionPipeline.from_single_file(..., config=<saved pipeline folder>)`` and every tensor
must come back bit-identical.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from utils.model.ldm_convert import pipeline_to_ldm, text_encoder_to_ldm, unet_to_ldm, vae_to_ldm

TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
    sample_size=16,
)
# Three levels, one layer per block, attention in two of them and two transformer layers each:
# exercises the input/output block numbering with a different stride than SD1.5's.
TINY_UNET_3 = dict(
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    transformer_layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
    sample_size=16,
)
# SD2 style: linear proj_in/proj_out, per-block head dims, upcast attention.
TINY_UNET_SD2 = dict(TINY_UNET, use_linear_projection=True, attention_head_dim=(4, 8), upcast_attention=True)

TINY_VAE = dict(
    block_out_channels=(8, 16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
)


def _bytes_to_unicode():
    # Same table as CLIP's byte-level BPE (transformers.models.clip.tokenization_clip.bytes_to_unicode).
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tiny_tokenizer(directory):
    """A 514-token CLIP tokenizer (byte symbols, their word-final forms, no merges, 2 specials)."""
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))


def _tiny_text_config(hidden_act="quick_gelu"):
    return CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1000,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )


def _build_pipeline(tmp_path, unet_kwargs, hidden_act):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_kwargs)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(_tiny_text_config(hidden_act))
    # Random init leaves norms at 1/0 and biases at 0; perturb everything so that a swapped pair of
    # tensors (e.g. norm1/norm2, q/k) cannot compare equal by accident.
    with torch.no_grad():
        for model in (unet, vae, text_encoder):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tiny_tokenizer(tmp_path / "tok"),
        unet=unet,
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path / "pipeline"
    pipe.save_pretrained(folder)
    # Keep only the configs: if from_single_file fell back to from_pretrained(folder) for any
    # component, it would now fail instead of silently reading the original weights.
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()
    return pipe, folder


def _assert_identical(original, loaded, what):
    a, b = original.state_dict(), loaded.state_dict()
    assert set(a) == set(b), f"{what}: key sets differ: {set(a) ^ set(b)}"
    for key in a:
        assert b[key].device.type != "meta", f"{what}: {key} was never loaded"
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def _n_expected(pipe):
    te_keys = [k for k in pipe.text_encoder.state_dict() if not k.endswith("embeddings.position_ids")]
    return len(pipe.unet.state_dict()) + len(pipe.vae.state_dict()) + len(te_keys)


def _assert_loads_back_identical(pipe, folder, ldm, tmp_path):
    """Writes the LDM dict and reads it back with diffusers' own single-file loader: every tensor must match."""
    path = tmp_path / "model.safetensors"
    save_file(ldm, str(path))
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    for part in ("unet", "vae", "text_encoder"):
        _assert_identical(getattr(pipe, part), getattr(loaded, part), part)


@pytest.mark.parametrize("unet_kwargs", [TINY_UNET, TINY_UNET_3], ids=["2-block", "3-block"])
def test_sd1_roundtrip_through_from_single_file(tmp_path, unet_kwargs):
    pipe, folder = _build_pipeline(tmp_path, unet_kwargs, hidden_act="quick_gelu")
    ldm = pipeline_to_ldm(pipe.unet, pipe.vae, pipe.text_encoder, dtype=torch.float32)

    assert len(ldm) == _n_expected(pipe)  # nothing dropped, nothing duplicated
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in ldm  # CLIP layout chosen
    assert not any(k.startswith("cond_stage_model.model.") for k in ldm)

    _assert_loads_back_identical(pipe, folder, ldm, tmp_path)


def test_sd2_openclip_roundtrip_through_from_single_file(tmp_path):
    pipe, folder = _build_pipeline(tmp_path, TINY_UNET_SD2, hidden_act="gelu")
    ldm = pipeline_to_ldm(pipe.unet, pipe.vae, pipe.text_encoder, dtype=torch.float32, text_encoder_layout="openclip")

    n_layers = pipe.text_encoder.config.num_hidden_layers
    # q/k/v weight and bias (6 tensors) fuse into in_proj_weight/in_proj_bias (2) per layer.
    assert len(ldm) == _n_expected(pipe) - 4 * n_layers
    assert not any(k.startswith("cond_stage_model.transformer.") for k in ldm)
    width = pipe.text_encoder.config.hidden_size
    assert ldm["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert ldm["cond_stage_model.model.positional_embedding"].shape == (77, width)
    # SD2's linear proj_in is stored 2-D in LDM too.
    assert ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2

    _assert_loads_back_identical(pipe, folder, ldm, tmp_path)


def test_openclip_text_projection_is_transposed_like_diffusers_expects():
    # SD2's own encoder has no projection, and diffusers ignores cond_stage_model.model.text_projection
    # (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE). The SDXL-refiner prefix goes through the same
    # convert_open_clip_checkpoint without that ignore list, so it checks the transpose.
    torch.manual_seed(0)
    config = _tiny_text_config("gelu")
    config.projection_dim = 24
    model = CLIPTextModelWithProjection(config)
    ldm = text_encoder_to_ldm(model.state_dict(), model.config, layout="openclip")
    assert ldm["cond_stage_model.model.text_projection"].shape == (32, 24)

    prefix = "conditioner.embedders.0.model."
    renamed = {prefix + k.removeprefix("cond_stage_model.model."): v for k, v in ldm.items()}
    back = convert_open_clip_checkpoint(model, renamed, prefix=prefix)
    original = model.state_dict()
    assert set(back) == set(original)
    for key in original:
        assert torch.equal(back[key], original[key]), key


def test_layout_chosen_from_config():
    with torch.device("meta"):
        vit_h = CLIPTextModel(
            CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                           hidden_act="gelu", projection_dim=1024)
        )
        vit_l = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           hidden_act="quick_gelu", projection_dim=768)
        )
    h = text_encoder_to_ldm(vit_h.state_dict(), vit_h.config)
    assert all(k.startswith("cond_stage_model.model.") for k in h)
    assert len(h) == 23 * 12 + 4  # per resblock: ln_1, in_proj, out_proj, ln_2, c_fc, c_proj (w+b); + 4 globals
    assert "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.bias" in h

    l = text_encoder_to_ldm(vit_l.state_dict(), vit_l.config)
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in l)
    assert len(l) == 196  # SD1.5 has 197 text keys: these + the non-learned embeddings.position_ids buffer
    assert "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight" in l
    assert text_encoder_to_ldm(vit_l.state_dict(), vit_l.config, layout="openclip").keys() != l.keys()


def test_sd15_sized_key_layout():
    """Key set for the real SD1.5 shapes (meta tensors, free), checked against diffusers' converters."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD_VAE)
    unet_sd = unet.state_dict()
    ldm = unet_to_ldm(unet_sd, unet.config)
    for key in (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",  # first downsampler
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",  # 320 -> 640 resnet
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",  # last down block, no attention
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.bias",
        "model.diffusion_model.output_blocks.2.1.conv.weight",  # upsampler of an up block without attention
        "model.diffusion_model.output_blocks.5.2.conv.weight",  # upsampler after an attention
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",  # diffusers' "v1" detection key
        "model.diffusion_model.time_embed.2.weight",
        "model.diffusion_model.out.0.weight",
        "model.diffusion_model.out.2.weight",
    ):
        assert key in ldm, key
    assert not any(k.startswith("model.diffusion_model.input_blocks.12.") for k in ldm)
    assert not any(k.startswith("model.diffusion_model.output_blocks.12.") for k in ldm)
    # SD1.5's LDM unet has 686 tensors: one per diffusers parameter, and diffusers' converter maps
    # the export back onto exactly the model's key set.
    assert len(unet_sd) == 686 and len(ldm) == 686
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(unet_sd)

    vae_sd = vae.state_dict()
    ldm_vae = vae_to_ldm(vae_sd, vae.config)
    assert len(ldm_vae) == 248
    assert ldm_vae["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    # LDM counts decoder up blocks from the lowest resolution.
    assert ldm_vae["first_stage_model.decoder.up.3.upsample.conv.weight"].shape[0] == 512
    assert "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight" in ldm_vae  # 256 -> 128 at full res
    assert "first_stage_model.encoder.down.3.downsample.conv.weight" not in ldm_vae
    back_vae = convert_ldm_vae_checkpoint(ldm_vae, dict(vae.config))
    assert set(back_vae) == set(vae_sd)
    assert all(back_vae[k].shape == vae_sd[k].shape for k in vae_sd)


def test_pipeline_to_ldm_dtype_and_layout_of_tensors():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    te = CLIPTextModel(_tiny_text_config())
    ldm = pipeline_to_ldm(unet, vae, te)  # default float16
    assert all(t.dtype == torch.float16 and t.is_contiguous() and t.device.type == "cpu" for t in ldm.values())
    assert not any(t.requires_grad for t in ldm.values())
    w = unet.state_dict()["down_blocks.0.resnets.0.norm1.weight"]
    assert torch.equal(ldm["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"], w.half())


def test_unknown_keys_are_rejected():
    # E.g. LoRA layers or a torch.compile "_orig_mod." prefix must not be silently left out of the file.
    unet = UNet2DConditionModel(**TINY_UNET)
    sd = dict(unet.state_dict())
    sd["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(1)
    ldm_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_A.weight"
    # Inside an attention subtree names pass through unchanged, so this one *is* mapped ...
    assert ldm_key in unet_to_ldm(sd, unet.config)
    # ... but a key outside every known module is an error.
    sd["_orig_mod.conv_in.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="_orig_mod.conv_in.weight"):
        unet_to_ldm(sd, unet.config)
    with pytest.raises(ValueError):
        text_encoder_to_ldm({}, _tiny_text_config(), layout="nope")
