"""EMA in real runs of train.py: decay from the strength target, update cadence, EMA checkpoints beside every save,
training unchanged by EMA, resuming the EMA (doc/EMA.md)."""
from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_MODEL, read_scalars, short_run


# -- real runs on the tiny model -----------------------------------------------------------------------------------
#
# 8 images at batch size 2 = 4 steps an epoch; grad_accum 2 = 2 optimizer updates an epoch; 3 epochs.
# ema_update_interval 3 updates the EMA after optimizer updates 3 and 6 = after steps 6 and 12. Checkpoints
# are saved after steps 4 and 8 (epoch cadence) and 12 (last).
STRENGTH = 0.1
RUN_FLAGS = ("--max_epochs", "3", "--grad_accum", "2", "--ema_update_interval", "3")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"unet.{k}": v for k, v in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items()} | \
        {f"te.{k}": v for k, v in load_file(folder / "text_encoder" / "model.safetensors").items()}


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """EMA from a strength target, both models sampled after step 8, single files too (`--no-no_save_ckpt`)."""
    from tests.conftest import small_dataset

    tmp = tmp_path_factory.mktemp("ema")
    data_root = small_dataset.__wrapped__(tmp)  # the fixture's body: this run is shared by the module's tests
    prompts = tmp / "prompts.txt"
    prompts.write_text("a red square\n")
    run = short_run(tmp, data_root, *RUN_FLAGS, "--ema_strength_target", str(STRENGTH), "--ema_decay_rate", "0.999",
                    "--save_every_n_epochs", "1", "--no-no_save_ckpt", "--sample_steps", "8",
                    "--no-generate_pretrain_samples",
                    "--sample_prompts", str(prompts), "--ema_sample_nonema_model", "--ema_sample_ema_model")
    return SimpleNamespace(run=run, ckpts=run / "ckpts", data_root=data_root, prompts=prompts,
                           log=(run / f"{run.name}.log").read_text())


def test_strength_target_decay_is_logged_and_overrides_the_rate(ema_run):
    assert "ema_strength_target 0.1 overrides ema_decay_rate 0.999" in ema_run.log
    logged = float(re.search(r"EMA: decay ([0-9.e-]+),", ema_run.log).group(1))
    total_steps, steps_per_update = 3 * 4, 3 * 2
    assert logged == pytest.approx(STRENGTH ** (steps_per_update / total_steps), rel=1e-9)
    assert logged == pytest.approx(0.316227766, rel=1e-9)


def test_ema_updates_at_its_cadence_by_the_formula(ema_run):
    decay = float(re.search(r"EMA: decay ([0-9.e-]+),", ema_run.log).group(1))
    base = weights(TINY_MODEL)
    ema4, ema8, ema12 = (weights(ema_run.ckpts / f"{name}_ema") for name in
                         ("myproj-ep01-gs00004", "myproj-ep02-gs00008", "last-myproj-ep03-gs00012"))
    live8, live12 = weights(ema_run.ckpts / "myproj-ep02-gs00008"), weights(ema_run.ckpts / "last-myproj-ep03-gs00012")
    assert ema4.keys() == base.keys() == live12.keys()
    # Nothing folded in before step 6: after step 4 the EMA is still exactly the starting model.
    assert all(torch.equal(ema4[k], base[k]) for k in base)
    # After step 8 it holds step 6's update only: neither the start nor the live weights of step 8.
    assert any(not torch.equal(ema8[k], base[k]) for k in base)
    assert any(not torch.allclose(ema8[k], live8[k], atol=1e-4) for k in base)
    # Step 12 folds the live weights into the average exactly once.
    for k in base:
        torch.testing.assert_close(ema12[k].double(), decay * ema8[k].double() + (1 - decay) * live12[k].double(),
                                   rtol=1e-6, atol=1e-7)
    assert max((live12[k] - ema8[k]).abs().max().item() for k in base) > 1e-3  # so the check above can tell


def test_ema_checkpoints_beside_every_save_load_in_diffusers(ema_run):
    from diffusers import StableDiffusionPipeline

    from utils.model import models

    names = {p.name for p in ema_run.ckpts.iterdir()}
    for name in ("myproj-ep01-gs00004", "myproj-ep02-gs00008", "last-myproj-ep03-gs00012"):
        assert {name, f"{name}_ema", f"{name}.safetensors", f"{name}_ema.safetensors"} <= names
    assert not [n for n in names if n.endswith(".partial")]
    folder = ema_run.ckpts / "last-myproj-ep03-gs00012_ema"
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    from_file = models.load(ema_run.ckpts / "last-myproj-ep03-gs00012_ema.safetensors")
    for part in ("unet", "text_encoder"):
        theirs = getattr(pipe, part).state_dict()
        for key, value in getattr(from_file, part).state_dict().items():
            assert torch.equal(value, theirs[key].half().float()), f"{part}.{key}"  # fp16 single file


def test_training_is_the_same_with_ema_samples_and_saves(ema_run, tmp_path):
    """The same run without EMA, samples or intermediate saves ends on bit-identical weights."""
    plain = short_run(tmp_path, ema_run.data_root, *RUN_FLAGS[:4])
    with_ema, without = weights(ema_run.ckpts / "last-myproj-ep03-gs00012"), weights(plain / "ckpts" /
                                                                                      "last-myproj-ep03-gs00012")
    assert all(torch.equal(with_ema[k], without[k]) for k in without)
    samples = sorted(p.name for p in (ema_run.run / "samples").glob("*.jpg"))
    assert samples == ["gs00008-000-a red square-s555.jpg", "gs00008-000_ema-a red square-s555.jpg"]
    assert sorted(read_scalars(ema_run.run)["_images"]) == ["sample_000_a red square", "sample_000_ema_a red square"]


def test_ema_resumes_from_a_single_file_and_samples_only_ema_by_default(ema_run, tmp_path):
    """ema_decay_rate 1 keeps the EMA at its starting weights, so they can be compared exactly."""
    from torch.utils.tensorboard import SummaryWriter

    from utils.model import models
    from utils.watch.sampling import SampleSchedule, SampleSettings, generate_samples

    start = ema_run.ckpts / "last-myproj-ep03-gs00012_ema.safetensors"
    run = short_run(tmp_path, ema_run.data_root, "--max_epochs", "1", "--ema_decay_rate", "1",
                    "--ema_update_interval", "1", "--ema_resume_model", str(start), "--sample_steps", "4",
                    "--no-generate_pretrain_samples",
                    "--sample_prompts", str(ema_run.prompts))
    assert f"EMA: starting from {start}." in (run / f"{run.name}.log").read_text()
    stored = models.load(start)
    expected = {f"unet.{k}": v for k, v in stored.unet.state_dict().items()} | \
        {f"te.{k}": v for k, v in stored.text_encoder.state_dict().items()}
    saved = weights(run / "ckpts" / "last-myproj-ep01-gs00004_ema")
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    assert sorted(p.name for p in (run / "samples").glob("*.jpg")) == ["gs00004-000_ema-a red square-s555.jpg"]

    # The EMA sample is the sample of the EMA model: render the stored UNet and text encoder with the run's VAE.
    writer = SummaryWriter(str(tmp_path / "direct"))
    event = SampleSchedule(ema_run.prompts, SampleSettings(batch_size=1, seed=555, resolution=128, every_n_steps=4,
                                                           generate_pretrain_samples=False)).prepare(4, [])
    (image,) = generate_samples(models.load(TINY_MODEL), stored.unet, stored.text_encoder, event, step=4,
                                out_dir=tmp_path / "direct", tb_writer=writer, autocast=contextlib.nullcontext,
                                label="ema")
    writer.close()
    assert image.read_bytes() == (run / "samples" / image.name).read_bytes()


def test_findlast_resumes_the_training_and_the_ema_checkpoints_frozen_text_encoder_not_averaged(ema_run, tmp_path):
    logdir = tmp_path / "logs"
    shutil.copytree(ema_run.run, logdir / ema_run.run.name)  # keeps the files' times, so the same one is newest
    run = short_run(tmp_path, ema_run.data_root, "--max_epochs", "1", "--resume_ckpt", "findlast",
                    "--ema_resume_model", "findlast", "--ema_decay_rate", "1", "--ema_update_interval", "1",
                    "--disable_textenc_training")
    last = logdir / ema_run.run.name / "ckpts" / "last-myproj-ep03-gs00012"
    log = (run / f"{run.name}.log").read_text()
    assert f"from {last} (" in log and f"EMA: starting from {last}_ema." in log
    saved, ema_start, live_start = (weights(run / "ckpts" / "last-myproj-ep01-gs00004_ema"),
                                    weights(Path(f"{last}_ema")), weights(last))
    for key in saved:
        # The UNet's average comes from the EMA checkpoint; the frozen text encoder is the live one.
        assert torch.equal(saved[key], (ema_start if key.startswith("unet.") else live_start)[key]), key
    assert any(not torch.equal(ema_start[k], live_start[k]) for k in saved if k.startswith("te."))
