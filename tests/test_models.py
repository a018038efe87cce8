"""Loading real-size SD1.5 / SD2 single files offline with the shipped configs, and refusing broken files.

The SD-size models have random weights (loading does not care) and are built on the meta device and filled
in place, so each costs seconds, not minutes.
"""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from scripts.make_random_sd import random_sd
from tests.conftest import TINY_MODEL
from utils.model import models, shipped
from utils.model.ldm_convert import pipeline_to_ldm


def assert_same_weights(model: models.StableDiffusion, originals):
    for name, original in zip(("unet", "vae", "text_encoder"), originals):
        loaded = getattr(model, name).state_dict()
        for key, value in original.state_dict().items():
            if key.endswith("position_ids"):
                continue
            assert torch.equal(loaded[key].half(), value), f"{name}.{key}"


# What real original SD files hold beyond the diffusers model: LDM's noise-schedule buffers and an EMA copy (SD1.5's
# v1-5-pruned files), CLIP's position-id buffer (SD1), OpenCLIP's 24th layer, text_projection and logit_scale (SD2).
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
EMA_COPY = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(0, dtype=torch.int32),
            "model_ema.diffusion_modelout2bias": torch.zeros(4, dtype=torch.float16)}


def original_extras(kind: str) -> dict[str, torch.Tensor]:
    extras = {name: torch.rand(1000) for name in SCHEDULE_BUFFERS}
    if kind == "sd1":
        return extras | {"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    last = "cond_stage_model.model.transformer.resblocks.23."
    shapes = {"ln_1.weight": [1024], "ln_1.bias": [1024], "attn.in_proj_weight": [3072, 1024],
              "attn.in_proj_bias": [3072], "attn.out_proj.weight": [1024, 1024], "attn.out_proj.bias": [1024],
              "ln_2.weight": [1024], "ln_2.bias": [1024], "mlp.c_fc.weight": [4096, 1024], "mlp.c_fc.bias": [4096],
              "mlp.c_proj.weight": [1024, 4096], "mlp.c_proj.bias": [1024]}
    return extras | {last + name: torch.rand(shape).half() for name, shape in shapes.items()} | {
        "cond_stage_model.model.text_projection": torch.rand(1024, 1024).half(),
        "cond_stage_model.model.logit_scale": torch.tensor(4.6052)}


def assert_saved_losslessly(original, saved):
    """Every key of the original but its EMA copy, and what the diffusers model does not hold bit-identical."""
    from safetensors import safe_open

    with safe_open(original, framework="pt") as before, safe_open(saved, framework="pt") as after:
        assert set(after.keys()) - set(models.SAMPLING_MARKS) == set(before.keys()) - set(EMA_COPY)
        extras = [key for key in before.keys() if key in SCHEDULE_BUFFERS or "position_ids" in key
                  or key.startswith(("cond_stage_model.model.transformer.resblocks.23.",
                                     "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"))]
        assert extras
        for key in extras:
            assert torch.equal(before.get_tensor(key), after.get_tensor(key)), key


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    parts = random_sd("sd15")
    folder = tmp_path_factory.mktemp("sd15")
    tensors = pipeline_to_ldm(*parts, dtype=torch.float16) | original_extras("sd1") | EMA_COPY
    save_file(tensors, folder / "sd15.safetensors")  # no metadata: like a file downloaded for A1111
    torch.save({"state_dict": tensors}, folder / "sd15.ckpt")
    return folder, parts


def test_sd15_single_file_loads_offline_as_sd1_epsilon(sd15_file):
    folder, parts = sd15_file
    for name in ("sd15.safetensors", "sd15.ckpt"):
        model = models.load(folder / name)
        assert model.family == "SD1.x" and model.prediction_type == "epsilon"
        assert model.tokenizer.pad_token == "<|endoftext|>"
        assert_same_weights(model, parts)
    saved = folder / "saved" / "sd15-again.safetensors"
    models.save_single_file(model, model.unet, model.text_encoder, saved, full_precision=False)
    assert_saved_losslessly(folder / "sd15.safetensors", saved)


def test_sd2_single_file_with_v_yaml_loads_as_768_v_prediction(tmp_path):
    parts = random_sd("sd2-v")
    file = tmp_path / "sd21.safetensors"
    save_file(pipeline_to_ldm(*parts, dtype=torch.float16) | original_extras("sd2") | EMA_COPY, file)
    file.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    model = models.load(file)
    assert model.family == "SD2.x" and model.prediction_type == "v_prediction"
    assert model.tokenizer.pad_token == "!"
    assert model.text_encoder.config.num_hidden_layers == 23
    assert_same_weights(model, parts)
    saved = tmp_path / "saved" / "sd21-trained.safetensors"
    models.save_single_file(model, model.unet, model.text_encoder, saved, full_precision=False)
    shipped_v_yaml = shipped.MODEL_CONFIGS / "ldm" / "v2-inference-v.yaml"
    assert saved.with_suffix(".yaml").read_text() == shipped_v_yaml.read_text()  # for image generators
    assert_saved_losslessly(file, saved)  # the real SD2 key set, OpenCLIP's 24 layers included
    file.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert models.load(file).prediction_type == "epsilon"


def test_our_single_file_carries_its_configs(tmp_path):
    """A single file saved by the trainer loads back exactly, even for an architecture no shipped config has."""
    tiny = models.load(TINY_MODEL)
    file = tmp_path / "tiny.safetensors"
    models.save_single_file(tiny, tiny.unet, tiny.text_encoder, file, full_precision=True)
    loaded = models.load(file)
    assert loaded.unet.config.block_out_channels == tiny.unet.config.block_out_channels
    assert loaded.prediction_type == tiny.prediction_type
    for name in ("unet", "vae", "text_encoder"):
        for key, value in getattr(tiny, name).state_dict().items():
            assert torch.equal(getattr(loaded, name).state_dict()[key], value), f"{name}.{key}"


def test_single_files_mark_how_image_generators_should_sample_them(tmp_path):
    """`v_pred` (ComfyUI's convention) for v-prediction and `ztsnr` (read by AUTOMATIC1111 for any architecture) for
    zero terminal SNR, as empty tensors; written from the model being saved, never carried from the file it came
    from (a flow model trained from a v-model file is no v-model)."""
    from safetensors import safe_open

    def marks(file):
        with safe_open(file, framework="pt") as f:
            return {key: f.get_slice(key).get_shape() for key in models.SAMPLING_MARKS if key in f.keys()}

    tiny = models.load(TINY_MODEL)
    epsilon = tmp_path / "epsilon.safetensors"
    models.save_single_file(tiny, tiny.unet, tiny.text_encoder, epsilon, full_precision=False)
    assert marks(epsilon) == {}
    tiny.scheduler = type(tiny.scheduler).from_config(tiny.scheduler.config, prediction_type="v_prediction")
    v = tmp_path / "v.safetensors"
    models.save_single_file(tiny, tiny.unet, tiny.text_encoder, v, full_precision=False)
    assert marks(v) == {"v_pred": [0]}
    tiny.use_zero_terminal_snr()
    ztsnr = tmp_path / "ztsnr.safetensors"
    models.save_single_file(tiny, tiny.unet, tiny.text_encoder, ztsnr, full_precision=False)
    assert marks(ztsnr) == {"v_pred": [0], "ztsnr": [0]}
    # diffusers (doc/TRAINING.md's table): the single file with the checkpoint's folder as its config, offline.
    from diffusers import StableDiffusionPipeline

    models.save_diffusers(tiny, tiny.unet, tiny.text_encoder, tmp_path / "folder")
    pipe = StableDiffusionPipeline.from_single_file(str(ztsnr), config=str(tmp_path / "folder"), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    assert (pipe.scheduler.config.prediction_type, pipe.scheduler.config.rescale_betas_zero_snr,
            pipe.scheduler.config.timestep_spacing) == ("v_prediction", True, "trailing")

    reloaded = models.load(ztsnr)
    assert reloaded.carried == {} and reloaded.scheduler.config.rescale_betas_zero_snr
    reloaded.scheduler = type(reloaded.scheduler).from_config(reloaded.scheduler.config, prediction_type="epsilon",
                                                              rescale_betas_zero_snr=False)
    again = tmp_path / "again.safetensors"
    models.save_single_file(reloaded, reloaded.unet, reloaded.text_encoder, again, full_precision=False)
    assert marks(again) == {}


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_ckpt_with_pickled_code_is_refused(tmp_path):
    file = tmp_path / "evil.ckpt"
    with open(file, "wb") as f:
        pickle.dump({"state_dict": RunsCode()}, f)
    with pytest.raises(models.ModelLoadError, match="evil.ckpt: cannot read this checkpoint"):
        models.load(file)
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


def test_broken_files_and_folders_get_clear_errors(tmp_path):
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((TINY_MODEL / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()[:5000])
    with pytest.raises(models.ModelLoadError, match="cut.safetensors: cannot read this checkpoint"):
        models.load(truncated)
    sdxl_like = tmp_path / "other.safetensors"
    save_file({"conditioner.embedders.0.weight": torch.zeros(2)}, sdxl_like)
    with pytest.raises(models.ModelLoadError, match="not a Stable Diffusion 1.x/2.x checkpoint"):
        models.load(sdxl_like)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(models.ModelLoadError, match="missing unet, vae, text_encoder, scheduler"):
        models.load(partial)
