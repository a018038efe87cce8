"""Tests of the files shipped with the project: CLIP tokenizers, SD config folders, the demo
data set and the tiny demo model.  Real objects, no mocks, no network (HF_HUB_OFFLINE=1)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers / transformers import huggingface_hub

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.model.shipped import CONFIG_KINDS, TOKENIZER_DIR, config_dir, load_tokenizer, save_tokenizer_files

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "demo" / "tiny-sd"
DEMO_DATA = REPO / "demo" / "data"
CONCEPTS = ["red_circle", "blue_square", "green_triangle", "yellow_cross"]

# ids of openai/clip-vit-large-patch14 for "a photo of a cat"
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


def _load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _image_tensor(path):
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1.0


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny models gain nothing from threads, and oversubscribed OpenMP threads (other jobs on
    a small machine) slow them down ~10x; restore the setting for the rest of the session."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- tokenizers


def test_shipped_vocab_files():
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    merges = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and vocab["!"] == 0
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894


def test_shipped_vocab_matches_openai_bpe_file_when_available():
    gz = Path("/tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz")
    if not gz.exists():
        pytest.skip("OpenAI BPE file not extracted here (see scripts/make_clip_tokenizer.py)")
    vocab, merges = _load_script("make_clip_tokenizer").build(gz)
    assert vocab == json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert merges == (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_tokenizer_known_ids(kind):
    tok = load_tokenizer(kind)
    assert tok("a photo of a cat").input_ids == CAT_IDS
    assert tok.model_max_length == 77
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok("A Photo  of a CAT").input_ids == CAT_IDS  # lower-cases, collapses whitespace
    long = tok("cat " * 100, truncation=True, max_length=tok.model_max_length).input_ids
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407


def test_tokenizer_padding():
    sd1 = load_tokenizer("sd1")("a photo of a cat", padding="max_length", max_length=77).input_ids
    sd2_tok = load_tokenizer("sd2")
    sd2 = sd2_tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert sd1 == CAT_IDS + [49407] * 70
    assert sd2_tok.pad_token == "!" and sd2_tok.pad_token_id == 0
    assert sd2 == CAT_IDS + [0] * 70


def test_save_tokenizer_files_roundtrip(tmp_path):
    from transformers import CLIPTokenizer

    save_tokenizer_files(tmp_path / "tok", "sd2")
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.pad_token == "!" and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == CAT_IDS


def test_unknown_kinds_rejected():
    with pytest.raises(ValueError):
        load_tokenizer("sdxl")
    with pytest.raises(ValueError):
        config_dir("sd3")


# ---------------------------------------------------------------- SD config folders

EXPECTED = {
    # kind: (unet params, text encoder params, cross_attention_dim, text hidden, act, prediction, sample_size)
    "sd15": (859_520_964, 123_060_480, 768, 768, "quick_gelu", "epsilon", 64),
    "sd2-base": (865_910_724, 340_387_840, 1024, 1024, "gelu", "epsilon", 64),
    "sd2-v": (865_910_724, 340_387_840, 1024, 1024, "gelu", "v_prediction", 96),
}


@pytest.mark.parametrize("kind", sorted(CONFIG_KINDS))
def test_config_folder_constructs(kind):
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    d = config_dir(kind)
    unet_n, te_n, xattn, hidden, act, pred, sample = EXPECTED[kind]
    index = json.loads((d / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False

    unet_cfg = UNet2DConditionModel.load_config(d / "unet")
    vae_cfg = AutoencoderKL.load_config(d / "vae")
    te_cfg = CLIPTextConfig.from_pretrained(d / "text_encoder")
    assert unet_cfg["cross_attention_dim"] == xattn and unet_cfg["sample_size"] == sample
    assert te_cfg.hidden_size == hidden and te_cfg.hidden_act == act and te_cfg.vocab_size == 49408
    assert te_cfg.max_position_embeddings == 77 and te_cfg.eos_token_id == 2

    # Build on the meta device: real module trees and parameter counts, no memory or init time.
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        te = CLIPTextModel(te_cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == unet_n
    assert count(te) == te_n
    assert count(vae) == 83_653_863
    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 4

    sched_cls = getattr(diffusers, index["scheduler"][1])
    sched = sched_cls.from_config(sched_cls.load_config(d / "scheduler"))
    assert sched.config.prediction_type == pred
    assert sched.config.beta_schedule == "scaled_linear"
    assert (sched.config.beta_start, sched.config.beta_end) == (0.00085, 0.012)
    assert sched.config.num_train_timesteps == 1000 and sched.config.steps_offset == 1


def test_sd2_unet_details():
    from diffusers import UNet2DConditionModel

    for kind in ("sd2-base", "sd2-v"):
        cfg = UNet2DConditionModel.load_config(config_dir(kind) / "unet")
        assert cfg["attention_head_dim"] == [5, 10, 20, 20] and cfg["use_linear_projection"] is True
    assert UNet2DConditionModel.load_config(config_dir("sd15") / "unet")["attention_head_dim"] == 8


# ---------------------------------------------------------------- demo data


def test_demo_data_layout():
    pngs = sorted(DEMO_DATA.glob("*.png"))
    assert len(pngs) == 40
    sizes = {}
    for p in pngs:
        concept = p.stem.rsplit("_", 1)[0]
        assert concept in CONCEPTS
        assert p.with_suffix(".txt").read_text().strip() == "a " + concept.replace("_", " ")
        size = Image.open(p).size
        sizes[size] = sizes.get(size, 0) + 1
    assert sizes == {(128, 128): 32, (192, 128): 4, (128, 192): 4}


def test_demo_data_is_reproducible():
    dd = _load_script("make_demo_data")
    items = dd.render_dataset(seed=0)
    assert len(items) == 40
    for stem, caption, img in random.Random(1).sample(items, 6):
        shipped = np.asarray(Image.open(DEMO_DATA / f"{stem}.png").convert("RGB"))
        assert np.array_equal(np.asarray(img), shipped), stem


# ---------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny_pipe():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(DEMO_MODEL), local_files_only=True)


def test_tiny_model_generates(tiny_pipe):
    assert tiny_pipe.tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert tiny_pipe.unet.config.cross_attention_dim == tiny_pipe.text_encoder.config.hidden_size
    assert tiny_pipe.scheduler.config.prediction_type == "epsilon"
    assert tiny_pipe.vae_scale_factor == 8
    out = tiny_pipe(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert out.shape == (1, 128, 128, 3)
    assert np.isfinite(out).all()


def test_tiny_model_files_small_and_fp32():
    from safetensors import safe_open

    total = sum(f.stat().st_size for f in DEMO_MODEL.rglob("*") if f.is_file())
    assert total < 15 * 2**20
    for f in DEMO_MODEL.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            assert all(sf.get_slice(k).get_dtype() == "F32" for k in sf.keys()), f


@pytest.fixture(scope="module")
def demo_latents(tiny_pipe):
    """(scaled posterior means, scaled posterior stds, labels) of the demo images."""
    vae = tiny_pipe.vae
    sf = vae.config.scaling_factor
    means, stds, labels = [], [], []
    with torch.no_grad():
        for p in sorted(DEMO_DATA.glob("*.png")):
            dist = vae.encode(_image_tensor(p)).latent_dist
            means.append(dist.mean[0] * sf)
            stds.append(dist.std[0] * sf)
            labels.append(p.stem.rsplit("_", 1)[0])
    return means, stds, labels


def test_vae_posterior_is_nearly_deterministic(demo_latents):
    means, stds, _ = demo_latents
    square = torch.stack([m for m in means if m.shape[-2:] == (16, 16)])
    spread = square.std(dim=0).mean().item()  # how much the means differ between images
    max_std = max(s.max().item() for s in stds)
    assert spread > 0.5
    assert max_std < 1e-3 * spread


def test_vae_scaled_latents_unit_variance(demo_latents):
    means, _, _ = demo_latents
    flat = torch.cat([m.flatten() for m in means])
    assert 0.8 < flat.std().item() < 1.25
    assert abs(flat.mean().item()) < 0.5


def test_vae_separates_concepts(demo_latents):
    """Leave-one-out nearest-centroid on simple latent statistics tells the concepts apart."""
    means, _, labels = demo_latents
    feats = torch.stack([torch.cat([m.amin((1, 2)), m.amax((1, 2)), m.mean((1, 2))]) for m in means])
    labels = np.array(labels)
    correct = 0
    for i in range(len(feats)):
        keep = np.arange(len(feats)) != i
        cents = {c: feats[keep & (labels == c)].mean(0) for c in CONCEPTS}
        correct += min(CONCEPTS, key=lambda c: (feats[i] - cents[c]).norm().item()) == labels[i]
    assert correct / len(feats) >= 0.9
    # and the concept centroids are far apart relative to the spread within a concept
    cents = {c: feats[labels == c].mean(0) for c in CONCEPTS}
    within = np.mean([(feats[labels == c] - cents[c]).norm(dim=1).mean().item() for c in CONCEPTS])
    between = min((cents[a] - cents[b]).norm().item() for a in CONCEPTS for b in CONCEPTS if a < b)
    assert between > 1.3 * within


def test_vae_reconstructs(tiny_pipe):
    vae = tiny_pipe.vae
    x = torch.cat([_image_tensor(DEMO_DATA / f"{c}_00.png") for c in CONCEPTS])
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    mse = ((rec - x) ** 2).mean().item()
    assert mse < 0.04  # untrained: ~0.3; 8x8 average pooling: ~0.011


def test_build_tiny_pipeline_v_prediction_fast():
    """The builder also works importable, for v-prediction, without VAE training (fast)."""
    mod = _load_script("make_tiny_model")
    pipe = mod.build_tiny_pipeline(prediction_type="v_prediction", seed=0, vae_train_steps=0)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.vae.config.latent_channels == 4 and pipe.vae_scale_factor == 8
    with torch.no_grad():
        dist = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist
    assert dist.mean.shape == (1, 4, 8, 8) and dist.std.max().item() < 1e-4
    out = pipe("a blue square", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3)
