"""Exact resume: the pieces of training state, and train.py runs interrupted and resumed."""
from __future__ import annotations

import random

import numpy as np
import torch

import data
from tests.conftest import TINY_MODEL
from utils.run import training_state


def test_random_generators_round_trip_through_the_state_file(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    torch.randn(5), random.random(), np.random.rand()
    state = training_state.TrainingState(epoch=1, step_in_epoch=2, global_step=3, fingerprint={}, rng=training_state.capture_rng())
    expected = (torch.randn(7), random.random(), np.random.rand(3), np.random.randn())
    training_state.save(state, tmp_path)
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    loaded = training_state.load(tmp_path)  # weights_only: nothing but plain data in the file
    assert (loaded.epoch, loaded.step_in_epoch, loaded.global_step) == (1, 2, 3)
    training_state.restore_rng(loaded.rng)
    again = (torch.randn(7), random.random(), np.random.rand(3), np.random.randn())
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1]
    assert np.array_equal(expected[2], again[2]) and expected[3] == again[3]
    assert training_state.load(tmp_path / "nothing-here") is None


def test_pending_gradients_are_restored_exactly():
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    grads = training_state.pending_gradients({"unet": model})
    other = torch.nn.Linear(3, 2)
    training_state.restore_gradients({"unet": other}, grads)
    assert torch.equal(other.weight.grad, model.weight.grad) and torch.equal(other.bias.grad, model.bias.grad)


def test_fingerprint_names_what_changed(small_dataset):
    from types import SimpleNamespace

    records = data.assign_buckets(data.scan(small_dataset).records, 128)
    args = SimpleNamespace(batch_size=2, grad_accum=1, seed=5, resolution=128, cache_latents=False)
    saved = training_state.fingerprint(args, records, 1, ["unet"])
    assert training_state.differences(saved, training_state.fingerprint(args, records, 1, ["unet"])) == []
    (small_dataset / "img_0.txt").write_text("a green square")
    changed = data.assign_buckets(data.scan(small_dataset).records, 128)
    args.batch_size = 4
    now = training_state.fingerprint(args, changed, 2, ["text_encoder", "unet"])
    assert training_state.differences(saved, now) == [
        "batch_size: 2 then, 4 now", "num_processes: 1 then, 2 now",
        "trained: ['unet'] then, ['text_encoder', 'unet'] now",
        "the training data (images, captions or their settings) changed"]


def test_a_loader_started_mid_epoch_yields_the_same_later_batches(small_dataset):
    from utils.model.models import load

    tokenizer = load(TINY_MODEL).tokenizer
    records = data.assign_buckets(data.scan(small_dataset).records, 128)
    plan = data.build_epoch_batches(records, 2, seed=3, epoch=1)
    options = dict(cond_dropout=0.5, seed=3, epoch=1, flip_p=0.5, shuffle_tags=True)
    full = list(data.make_epoch_loader(plan, records, tokenizer, **options))
    late = list(data.make_epoch_loader(plan, records, tokenizer, **options, start_step=2))
    assert len(late) == len(full) - 2
    for a, b in zip(full[2:], late):
        assert a["captions"] == b["captions"] and torch.equal(a["pixel_values"], b["pixel_values"])


# -- train.py runs stopped and resumed ----------------------------------------------------------------------------

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tests.conftest import REPO, write_json  # noqa: E402

# 8 training images in two buckets, batch 2: 5 steps an epoch (a runt batch) in grad_accum windows of 2, 2 and 1; EMA and validation on; per-sample randomness
# (flips, caption dropout) and the noise all draw from the state that a resume must restore.
RUN_ARGS = ["--resolution", "128", "--batch_size", "2", "--grad_accum", "2", "--max_epochs", "2", "--log_step", "1",
            "--sample_steps", "0", "--no_save_ckpt", "--save_optimizer", "--flip_p", "0.5", "--cond_dropout", "0.3",
            "--ema_decay_rate", "0.8", "--ema_update_interval", "1", "--lr_scheduler", "cosine", "--seed", "11",
            "--optimizer_config", str(REPO / "cfgs" / "tiny_optimizer.json")]


def run_args(data_root: Path, logdir: Path, validation_cfg: Path, *extra: str) -> list[str]:
    return ["--resume_ckpt", str(TINY_MODEL), "--data_root", str(data_root), "--logdir", str(logdir),
            "--validation_config", str(validation_cfg), *RUN_ARGS, *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"unet.{k}": v for k, v in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items()} | \
        {f"te.{k}": v for k, v in load_file(folder / "text_encoder" / "model.safetensors").items()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def train(args: list[str]) -> int:
    import train as train_module

    return train_module.main(args)


def newest_run(logdir: Path) -> Path:
    return max(logdir.iterdir(), key=lambda p: p.stat().st_mtime)


def resume_data(root: Path) -> tuple[Path, Path]:
    """(data folder, validation config) of RUN_ARGS's runs: 10 captioned squares in two buckets, 2 kept apart for
    validation."""
    from PIL import Image

    data_root = root / "images"
    data_root.mkdir()
    for i in range(10):
        Image.new("RGB", (64, 64) if i < 7 else (96, 64), (20 * i, 200 - 15 * i, 90)).save(data_root / f"{i}.png")
        (data_root / f"{i}.txt").write_text(f"a square of colour {i}, plain")
    return data_root, write_json(root / "validation.json", {"val_split_mode": "automatic", "auto_split_proportion": 0.2,
                                                             "every_n_epochs": 0.5, "seed": 3})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, saving a resumable checkpoint after every step (ckpt_every_n_minutes ~ 0)."""
    root = tmp_path_factory.mktemp("resume")
    data_root, validation_cfg = resume_data(root)
    logdir = root / "logs"
    assert train(run_args(data_root, logdir, validation_cfg, "--ckpt_every_n_minutes", "1e-9")) == 0
    run = newest_run(logdir)
    return dict(root=root, data_root=data_root, validation_cfg=validation_cfg, run=run,
                final=run / "ckpts" / "last-myproj-ep02-gs00010")


def scalars(run: Path) -> dict[str, dict[int, float]]:
    from tests.conftest import read_scalars

    return {tag: dict(values) for tag, values in read_scalars(run).items() if not tag.startswith("performance")}


def test_saving_resumable_checkpoints_does_not_change_training(reference, tmp_path):
    logdir = tmp_path / "logs"
    assert train(run_args(reference["data_root"], logdir, reference["validation_cfg"])) == 0
    plain = newest_run(logdir)
    assert_same_weights(plain / "ckpts" / "last-myproj-ep02-gs00010", reference["final"])
    assert_same_weights(plain / "ckpts" / "last-myproj-ep02-gs00010_ema", reference["final"].with_name(
        reference["final"].name + "_ema"))


@pytest.mark.parametrize("step, mid_window", [(3, True), (5, False), (7, False)],
                         ids=["inside a grad_accum window", "at the end of an epoch", "between windows"])
def test_a_run_resumed_from_any_step_ends_on_the_same_weights_bit_for_bit(reference, tmp_path, step, mid_window):
    epoch = (step - 1) // 5
    checkpoint = reference["run"] / "ckpts" / f"myproj-ep{epoch:02d}-gs{step:05d}"
    state = training_state.load(checkpoint)
    assert state.global_step == step and (state.epoch, state.step_in_epoch) == (epoch, step - 5 * epoch)
    assert bool(state.pending_grads["unet"]) == mid_window  # half a window's gradients travel with it
    logdir = tmp_path / "logs"
    assert train(run_args(reference["data_root"], logdir, reference["validation_cfg"], "--resume_ckpt",
                          str(checkpoint))) == 0
    resumed = newest_run(logdir)
    assert "Resuming the run of" in (resumed / f"{resumed.name}.log").read_text()
    assert_same_weights(resumed / "ckpts" / "last-myproj-ep02-gs00010", reference["final"])
    assert_same_weights(resumed / "ckpts" / "last-myproj-ep02-gs00010_ema",
                        reference["final"].with_name(reference["final"].name + "_ema"))
    # The curves continue where they stopped: each value logged after the resume is the reference's (an epoch
    # whose last step was the resume point logs its epoch loss then), and none after the resume point is missing.
    before, after = scalars(reference["run"]), scalars(resumed)
    for tag in ("loss/log_step", "loss/epoch", "loss/val", "hyperparameter/lr unet"):
        assert all(before[tag][s] == value for s, value in after[tag].items()), tag
        assert {s for s in before[tag] if s > step} <= set(after[tag]), tag


def test_fused_backward_trains_the_same_weights_and_ema(reference, tmp_path):
    """On the CPU in fp32 each bucket's AdamW step inside the backward pass is the same arithmetic as one AdamW over
    all parameters after it, grad_accum windows included (the hooks update at a window's last step only)."""
    logdir = tmp_path / "logs"
    assert train(run_args(reference["data_root"], logdir, reference["validation_cfg"], "--fused_backward")) == 0
    fused = newest_run(logdir) / "ckpts" / "last-myproj-ep02-gs00010"
    assert_same_weights(fused, reference["final"])
    assert_same_weights(fused.with_name(fused.name + "_ema"), reference["final"].with_name(
        reference["final"].name + "_ema"))


def test_a_changed_dataset_or_batch_size_starts_a_new_run_from_the_weights(reference, tmp_path, capsys):
    checkpoint = reference["run"] / "ckpts" / "myproj-ep00-gs00003"
    logdir = tmp_path / "logs"
    assert train(run_args(reference["data_root"], logdir, reference["validation_cfg"], "--resume_ckpt",
                          str(checkpoint), "--batch_size", "1", "--max_epochs", "1")) == 0
    console = "".join(capsys.readouterr())
    assert "holds a resumable run, but batch_size: 2 then, 1 now: starting a new run from its weights" in console
    assert "Resuming the run" not in console


def launch(args: list[str], **popen) -> subprocess.Popen:
    # As many threads as this process trains with: the float sums, and so the weights, depend on it.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("signal_to_send, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_resumable_checkpoint_that_continues_exactly(reference, tmp_path, signal_to_send,
                                                                        exit_code):
    logdir = tmp_path / "logs"
    process = launch(run_args(reference["data_root"], logdir, reference["validation_cfg"],
                              "--ckpt_every_n_minutes", "1e-9"))
    wait_for(lambda: list(logdir.glob("*/ckpts/myproj-ep00-gs00002")), process)  # training is under way
    process.send_signal(signal_to_send)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == exit_code, output[-3000:]
    assert "stopping after this step and saving a resumable checkpoint" in output and "Traceback" not in output
    (interrupted,) = (p for p in logdir.glob("*/ckpts/interrupted-gs*") if not p.name.endswith("_ema"))
    assert training_state.load(interrupted).global_step == int(interrupted.name.split("gs")[1])

    assert train(run_args(reference["data_root"], logdir, reference["validation_cfg"], "--resume_ckpt",
                          "findlast", "--project_name", "myproj")) == 0
    resumed = newest_run(logdir)
    assert f"Resuming the run of {interrupted}" in (resumed / f"{resumed.name}.log").read_text()
    assert_same_weights(resumed / "ckpts" / "last-myproj-ep02-gs00010", reference["final"])


def test_a_second_ctrl_c_stops_at_once_and_a_kill_during_a_save_leaves_the_last_checkpoint(reference, tmp_path):
    logdir = tmp_path / "logs"
    process = launch(run_args(reference["data_root"], logdir, reference["validation_cfg"],
                              "--ckpt_every_n_minutes", "1e-9"))
    wait_for(lambda: list(logdir.glob("*/ckpts/myproj-ep00-gs00002")), process)
    process.send_signal(signal.SIGINT)
    wait_for(lambda: list(logdir.glob("*/ckpts/interrupted-gs*.partial")), process)  # the save is being written
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 130 and "Stopped at once, without saving." in output, output[-3000:]
    assert not list(logdir.glob("*/ckpts/interrupted-gs*"))  # neither finished nor half-written

    logdir = tmp_path / "killed"
    process = launch(run_args(reference["data_root"], logdir, reference["validation_cfg"],
                              "--ckpt_every_n_minutes", "1e-9"))
    wait_for(lambda: list(logdir.glob("*/ckpts/myproj-ep00-gs00003")) and
             list(logdir.glob("*/ckpts/*.partial")), process)
    process.kill()  # kill -9 in the middle of writing a checkpoint
    process.communicate(timeout=60)
    assert train(run_args(reference["data_root"], logdir, reference["validation_cfg"], "--resume_ckpt",
                          "findlast")) == 0  # the newest complete checkpoint, not the half-written one
    assert_same_weights(newest_run(logdir) / "ckpts" / "last-myproj-ep02-gs00010", reference["final"])


def test_a_full_disk_is_reported_and_leaves_nothing_half_written(reference, tmp_path):
    """Files may not grow past 1 MB in this process (RLIMIT_FSIZE): every checkpoint write fails as on a full
    disk. The run reports each failed save, keeps training, and says at the end that its final save failed."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    logdir = tmp_path / "logs"
    process = launch(run_args(reference["data_root"], logdir, reference["validation_cfg"], "--max_epochs", "1",
                              "--save_every_n_epochs", "1"), preexec_fn=limit_file_size)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 1, output[-3000:]
    assert "Could not save checkpoint last-myproj-ep01-gs00005" in output and "File too large" in output
    assert "its final checkpoint could not be saved" in output and "Traceback" not in output
    assert not list(logdir.glob("*/ckpts/*"))  # no half-written folder or file anywhere


def test_a_diverging_run_skips_non_finite_updates_then_stops_with_the_cause(reference, tmp_path, capsys):
    """A learning rate of 1e12 blows the weights up after one update; from then on every gradient is NaN. Those
    updates are skipped (the weights stay finite) and after max_skipped_updates in a row the run saves and stops."""
    logdir = tmp_path / "logs"
    status = train(run_args(reference["data_root"], logdir, reference["validation_cfg"], "--lr", "1e12",
                            "--grad_accum", "1", "--max_skipped_updates", "3"))
    console = "".join(capsys.readouterr())
    assert status == 3
    assert "gradients were not finite (inf or NaN) for 3 optimizer updates in a row" in console
    assert "learning rate too high" in console
    (saved,) = (p for p in logdir.glob("*/ckpts/errored-*") if not p.name.endswith("_ema"))
    assert f"saved in {saved}" in console
    assert all(torch.isfinite(t).all() or not t.is_floating_point() for t in weights(saved).values())
    steps = [int(line.split("Step ")[1].split(":")[0]) for line in console.splitlines()
             if "gradients not finite; update skipped" in line]
    assert steps == list(range(steps[0], steps[0] + 3))  # skipped one after another, then the stop
