"""Single files go back into image generators losslessly (doc/TRAINING.md, "Checkpoints"): an original-layout file
is loaded, trained a step and saved, and the saved file has every key of the original except its EMA copy, with
what was not trained bit-identical; saved files get the permissions of any file the user makes.

The originals are the tiny demo model in the two layouts, with what real SD1.5 / SD2.x files hold beyond the
diffusers model: LDM's noise-schedule buffers, an EMA copy (`model_ema.*`), the CLIP position-id buffer (SD1), and
for SD2 OpenCLIP's last text encoder layer, `text_projection` and `logit_scale`, which diffusers drops."""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import REPO, TINY_MODEL

LDM_SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                        "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                        "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                        "posterior_mean_coef1", "posterior_mean_coef2")


def tiny_sd2_folder(tmp_path: Path) -> Path:
    """The demo model with an SD2-kind text encoder (GELU: OpenCLIP's layout in single files)."""
    import json

    folder = tmp_path / "tiny-sd2"
    shutil.copytree(TINY_MODEL, folder)
    config_file = folder / "text_encoder" / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"hidden_act": "gelu"}))
    return folder


def original_file(model_folder: Path, out: Path) -> tuple[Path, set[str]]:
    """An original-layout single file of the model with the extra tensors of a real SD file; returns it and the
    keys a saved file must not keep (the EMA copy)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from utils.model import models
    from utils.model.ldm_convert import OPENCLIP_PREFIX, text_encoder_to_ldm, text_layout

    model = models.load(model_folder)
    base = out.with_name("base.safetensors")
    models.save_single_file(model, model.unet, model.text_encoder, base, full_precision=True)
    with safe_open(base, framework="pt") as f:
        tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    generator = torch.Generator().manual_seed(3)
    extra = {name: torch.rand(1000, generator=generator) for name in LDM_SCHEDULE_BUFFERS}
    ema = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1234, dtype=torch.int32),
           "model_ema.diffusion_modelconv_inweight": torch.rand(8, 4, 3, 3, generator=generator)}
    te_config = model.text_encoder.config
    if text_layout(te_config) == "openclip":
        # One more layer than the model's, as OpenCLIP ViT-H has 24 where SD2's diffusers encoder keeps 23.
        layers = te_config.num_hidden_layers
        torch.manual_seed(5)
        deeper = CLIPTextModel(CLIPTextConfig(**{**te_config.to_dict(), "num_hidden_layers": layers + 1}))
        last = f"{OPENCLIP_PREFIX}transformer.resblocks.{layers}."
        extra |= {key: value for key, value in text_encoder_to_ldm(deeper.state_dict(), deeper.config).items()
                  if key.startswith(last)}
        extra[f"{OPENCLIP_PREFIX}text_projection"] = torch.rand(te_config.hidden_size, te_config.hidden_size,
                                                                generator=generator)
        extra[f"{OPENCLIP_PREFIX}logit_scale"] = torch.tensor(4.6052)
    else:
        extra["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(tensors | extra | ema, str(out), metadata=metadata)
    return out, set(ema)


def train_from(tmp_path: Path, original: Path, data_root: Path) -> Path:
    """One epoch of two steps from `original`, saving a diffusers folder and a full-precision single file, with
    umask 027 (so a mode of 0640 can only come from the umask). Returns the run folder."""
    import train

    previous = os.umask(0o027)
    try:
        status = train.main(["--resume_ckpt", str(original), "--data_root", str(data_root), "--resolution", "64",
                             "--batch_size", "4", "--max_epochs", "1", "--optimizer_config",
                             str(REPO / "cfgs" / "tiny_optimizer.json"), "--sample_steps", "0",
                             "--no-generate_pretrain_samples", "--save_full_precision", "--save_optimizer",
                             "--logdir", str(tmp_path / "logs")])
    finally:
        os.umask(previous)
    assert status == 0
    (run,) = (tmp_path / "logs").iterdir()
    return run


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_a_saved_single_file_keeps_every_key_of_the_original_and_what_was_not_trained(tmp_path, small_dataset, kind):
    from utils.model import models
    from utils.model.ldm_convert import ldm_keys

    model_folder = TINY_MODEL if kind == "sd1" else tiny_sd2_folder(tmp_path)
    original, dropped = original_file(model_folder, tmp_path / "original.safetensors")
    run = train_from(tmp_path, original, small_dataset)
    (saved,) = run.glob("ckpts/last-*.safetensors")
    with safe_open(original, framework="pt") as before, safe_open(saved, framework="pt") as after:
        assert set(after.keys()) == set(before.keys()) - dropped
        trained = [key for key in after.keys() if key.startswith("model.diffusion_model.")]
        assert any(not torch.equal(before.get_tensor(key), after.get_tensor(key)) for key in trained)
        untrained = [key for key in after.keys() if not key.startswith(("model.diffusion_model.", "cond_stage_model."))
                     or key.startswith(tuple(f"cond_stage_model.model.{k}" for k in ("transformer.resblocks.2.",
                                                                                     "text_projection", "logit_scale")))
                     or key.endswith("position_ids")]
        assert len(untrained) > len(LDM_SCHEDULE_BUFFERS) + 100  # the VAE and the carried tensors
        for key in untrained:
            assert torch.equal(before.get_tensor(key), after.get_tensor(key)), key
    log = (run / f"{run.name}.log").read_text()
    assert "Single-file saves carry" in log and "lack" not in log

    # The diffusers folder keeps them for later saves (resuming from it, then saving a single file).
    (folder,) = [p for p in run.glob("ckpts/last-*") if p.is_dir()]
    with safe_open(original, framework="pt") as before:
        reloaded = models.load(folder)
        assert reloaded.carried.keys() == \
            set(before.keys()) - dropped - ldm_keys(reloaded.unet, reloaded.vae, reloaded.text_encoder)
        carried = reloaded.carried
        assert all(torch.equal(tensor, before.get_tensor(key)) for key, tensor in carried.items())

    # Every file and folder saved has the umask's permissions (027: 0640 / 0750), not safetensors' 0600.
    saved_paths = [saved, folder, *folder.rglob("*")]
    assert {"training_state.pt", "optimizer_unet.pt", "ldm_carried.safetensors"} <= {p.name for p in saved_paths}
    for path in saved_paths:
        assert stat.S_IMODE(path.stat().st_mode) == (0o750 if path.is_dir() else 0o640), path


def test_a_folder_without_the_last_openclip_layer_says_what_its_single_files_lack(tmp_path):
    from utils.model import models

    summary = models.load(tiny_sd2_folder(tmp_path)).carried_summary()
    assert len(summary) == 1
    assert "Single files saved from this run lack cond_stage_model.model.transformer.resblocks.2.*, " \
           "cond_stage_model.model.text_projection and cond_stage_model.model.logit_scale" in summary[0]
    assert models.load(TINY_MODEL).carried_summary() == []
