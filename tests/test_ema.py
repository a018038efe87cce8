"""EMA (issue #5): the update against its formula, its cadence in real runs on the tiny model, the `_ema`
checkpoints beside every save (loaded back by diffusers), resuming the EMA, and which models are sampled."""
from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_MODEL
from tests.test_checkpoint import make_ckpt
from tests.conftest import read_scalars, short_run
from utils.run.checkpoint import find_last
from utils.watch.ema import EMA, sampled_models

# -- the update, on small modules -------------------------------------------------------------------------------


def small_modules() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"unet": torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4)),
            "text_encoder": torch.nn.Linear(3, 2)}


def params(modules) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules.values() for p in m.parameters()]


def set_params(modules, generator) -> list[torch.Tensor]:
    """Gives every parameter new random values, as an optimizer step would change them; returns them."""
    with torch.no_grad():
        for module in modules.values():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
    return params(modules)


@pytest.mark.parametrize("chunk_elements", [2**28, 7])  # one copy chunk, or many (some a single parameter)
def test_update_every_interval_follows_the_formula(monkeypatch, chunk_elements):
    monkeypatch.setattr("utils.watch.ema.COPY_CHUNK_ELEMENTS", chunk_elements)
    modules = small_modules()
    initial = params(modules)
    decay, every = 0.9, 3
    ema = EMA(modules, decay, every, torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    updated_at, live_at_updates = [], []
    for optimizer_update in range(1, 11):
        live = set_params(modules, generator)
        if ema.step():
            updated_at.append(optimizer_update)
            live_at_updates.append(live)
    assert updated_at == [3, 6, 9]
    # Closed form, in float64: d^3 * initial + (1 - d) * (d^2 * live_3 + d * live_6 + live_9).
    with ema.swapped_in():
        averaged = params(modules)
    for i, value in enumerate(averaged):
        expected = decay ** 3 * initial[i].double() + (1 - decay) * sum(
            decay ** (2 - k) * live[i].double() for k, live in enumerate(live_at_updates))
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(value, live_at_updates[-1][i], atol=1e-3)  # far from the live weights


def test_swapping_in_shows_the_average_and_restores_the_live_weights_bit_for_bit():
    modules = small_modules()
    initial = params(modules)
    ema = EMA(modules, 0.5, 1, torch.device("cpu"))
    live = set_params(modules, torch.Generator().manual_seed(2))
    assert ema.step()
    norm = modules["unet"][1]
    norm.running_mean.fill_(7.0)  # a buffer: never averaged, always the live one
    live_storage = [p.data_ptr() for m in modules.values() for p in m.parameters()]
    with ema.swapped_in():
        for value, before, after in zip(params(modules), initial, live):
            torch.testing.assert_close(value, 0.5 * before + 0.5 * after)
        assert torch.equal(norm.running_mean, torch.full((4,), 7.0))
    for value, expected in zip(params(modules), live):
        assert torch.equal(value, expected)
    assert [p.data_ptr() for m in modules.values() for p in m.parameters()] == live_storage


@pytest.mark.parametrize("nonema, ema, expected", [
    (False, False, ["ema"]), (True, False, [""]), (False, True, ["ema"]), (True, True, ["", "ema"])])
def test_which_models_are_sampled(nonema, ema, expected):
    args = SimpleNamespace(ema_decay_rate=0.99, ema_strength_target=None, ema_sample_nonema_model=nonema,
                           ema_sample_ema_model=ema)
    assert sampled_models(args) == expected
    assert sampled_models(SimpleNamespace(**{**vars(args), "ema_decay_rate": None})) == [""]  # EMA off


def test_findlast_for_the_ema_picks_only_ema_folders(tmp_path):
    live = make_ckpt(tmp_path / "run" / "ckpts" / "last-p-ep02-gs00020", 10)
    older_ema = make_ckpt(tmp_path / "run" / "ckpts" / "p-ep01-gs00010_ema", 100)
    newer_ema = make_ckpt(tmp_path / "run" / "ckpts" / "last-p-ep02-gs00020_ema", 20)
    make_ckpt(tmp_path / "run" / "ckpts" / "p-ep03-gs00030_ema.partial", 1)
    assert find_last(tmp_path, ema=True) == newer_ema
    assert find_last(tmp_path) == live
    shutil.rmtree(newer_ema)
    shutil.rmtree(older_ema)
    with pytest.raises(FileNotFoundError, match="ema_resume_model 'findlast': no EMA checkpoint"):
        find_last(tmp_path, ema=True)


# -- bad options stop the run before any model loads ------------------------------------------------------------


def run_main(tmp_path, data_root, *flags) -> int:
    import train

    return train.main(["--resume_ckpt", str(TINY_MODEL), "--data_root", str(data_root), "--resolution", "128",
                       "--logdir", str(tmp_path / "logs"), *flags])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_ema_on_cuda_without_a_gpu_is_refused(tmp_path, small_dataset, capsys):
    assert run_main(tmp_path, small_dataset, "--ema_decay_rate", "0.99", "--ema_device", "cuda") == 2
    assert "command line: ema_device is 'cuda' but PyTorch sees no CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("flags, message", [
    (["--ema_resume_model", "x"], "ema_resume_model is set but EMA is off"),
    (["--ema_decay_rate", "0.9", "--ema_resume_model", "missing_ema"], "ema_resume_model 'missing_ema' does not exist"),
    (["--ema_decay_rate", "0.9", "--ema_resume_model", "findlast"], "no EMA checkpoint folder"),
])
def test_bad_ema_resume_options_are_refused(tmp_path, small_dataset, capsys, flags, message):
    assert run_main(tmp_path, small_dataset, *flags) == 2
    assert message in capsys.readouterr().out
    assert not (tmp_path / "logs").exists()


def test_ema_of_another_architecture_is_refused_before_training(tmp_path, small_dataset, capsys):
    from transformers import CLIPTextConfig, CLIPTextModel

    other = tmp_path / "other-sd"
    shutil.copytree(TINY_MODEL, other)
    config = CLIPTextConfig.from_pretrained(TINY_MODEL / "text_encoder")
    config.num_hidden_layers = 1
    CLIPTextModel(config).save_pretrained(other / "text_encoder")
    assert run_main(tmp_path, small_dataset, "--ema_decay_rate", "0.9", "--ema_resume_model", str(other)) == 2
    assert re.search(rf"ema_resume_model {re.escape(str(other))}: its text_encoder does not fit the model being "
                     r"trained \(missing '[\w.]*encoder\.layers\.1\.", capsys.readouterr().out)
    assert not (tmp_path / "logs").exists()


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
