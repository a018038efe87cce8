"""train.py runs with the memory means (doc/MEMORY.md): bf16 weights with stochastic or compensated rounding and the
optimizer step fused into the backward pass (with partial checkpointing, resumed with attention checkpointing) resume
bit for bit; conflicting options stop before loading. (fused_backward alone trains test_resume's reference weights bit for bit:
tests/e2e/test_resume.py.)"""
from __future__ import annotations

import pytest
import torch

from tests.e2e.test_resume import assert_same_weights, newest_run, resume_data, run_args, train, weights
from tests.conftest import write_json
from utils.run import training_state

FINAL = "last-myproj-ep02-gs00010"
LEAN = ("--fused_backward", "--bf16_weights", "--partial_checkpointing")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """test_resume's data and options (10 images, batch 2, grad_accum 2, EMA, validation), trained with
    fused_backward + bf16_weights + partial_checkpointing, saving a resumable checkpoint after every step."""
    root = tmp_path_factory.mktemp("memory")
    data_root, validation_cfg = resume_data(root)
    logdir = root / "lean"
    assert train(run_args(data_root, logdir, validation_cfg, *LEAN, "--ckpt_every_n_minutes", "1e-9")) == 0
    return dict(data_root=data_root, validation_cfg=validation_cfg, lean=newest_run(logdir))


def test_bf16_weights_train_in_bf16_and_a_resumed_run_ends_on_the_same_weights(runs, tmp_path):
    lean = runs["lean"] / "ckpts"
    final = weights(lean / FINAL)
    assert {t.dtype for t in final.values()} == {torch.bfloat16}  # saved as trained
    start = weights(lean / "myproj-ep00-gs00001")
    moved = [k for k in final if not torch.equal(final[k], start[k])]
    assert len(moved) > 0.9 * len(final)
    last = weights(lean / "myproj-ep01-gs00009")
    assert sum(not torch.equal(final[k], last[k]) for k in final) > 0.9 * len(final)  # at every update
    ema = weights(lean / f"{FINAL}_ema")
    assert {t.dtype for t in ema.values()} == {torch.float32}  # the average keeps fp32
    checkpoint = lean / "myproj-ep00-gs00003"  # inside a grad_accum window
    assert training_state.load(checkpoint).pending_grads["unet"]
    assert (checkpoint / "optimizer_stochastic_rounding.pt").is_file()
    logdir = tmp_path / "logs"
    # Resumed checkpointing the top transformer blocks instead of the top blocks whole: the same gradients, bit for bit.
    attention = [flag.replace("partial", "attention") for flag in LEAN]
    assert train(run_args(runs["data_root"], logdir, runs["validation_cfg"], *attention, "--resume_ckpt",
                          str(checkpoint))) == 0
    resumed = newest_run(logdir)
    assert "Resuming the run of" in (resumed / f"{resumed.name}.log").read_text()
    assert_same_weights(resumed / "ckpts" / FINAL, lean / FINAL)
    assert_same_weights(resumed / "ckpts" / f"{FINAL}_ema", lean / f"{FINAL}_ema")


def test_compensated_rounding_saves_each_weights_rounding_error_and_resumes_bit_for_bit(runs, tmp_path):
    """bf16_rounding compensated: no random stream; the optimizer state saved with a checkpoint holds each weight's
    rounding error in bf16, a run resumed from it ends on the uninterrupted run's weights, and a run without the means
    loads it too."""
    flags = (*LEAN, "--bf16_rounding", "compensated")
    logdir = tmp_path / "compensated"
    assert train(run_args(runs["data_root"], logdir, runs["validation_cfg"], *flags, "--ckpt_every_n_minutes",
                          "1e-9")) == 0
    ckpts = newest_run(logdir) / "ckpts"
    checkpoint = ckpts / "myproj-ep00-gs00003"  # inside a grad_accum window
    assert not (checkpoint / "optimizer_stochastic_rounding.pt").exists()
    errors = [s["bf16_rounding_error"] for s in torch.load(checkpoint / "optimizer_unet.pt")["state"].values()]
    assert errors and all(e.dtype == torch.bfloat16 for e in errors) and any(bool((e != 0).any()) for e in errors)
    final, stochastic = weights(ckpts / FINAL), weights(runs["lean"] / "ckpts" / FINAL)
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    assert any(not torch.equal(final[k], stochastic[k]) for k in final)  # rounded otherwise

    resumed_logs = tmp_path / "resumed"
    assert train(run_args(runs["data_root"], resumed_logs, runs["validation_cfg"], *flags, "--resume_ckpt",
                          str(checkpoint))) == 0
    assert_same_weights(newest_run(resumed_logs) / "ckpts" / FINAL, ckpts / FINAL)
    plain_logs = tmp_path / "plain"
    assert train(run_args(runs["data_root"], plain_logs, runs["validation_cfg"], "--resume_ckpt",
                          str(ckpts / "myproj-ep00-gs00005"))) == 0
    log = (newest_run(plain_logs) / f"{newest_run(plain_logs).name}.log").read_text()
    assert "Loaded optimizer state" in log and "does not fit" not in log


def test_a_run_saved_with_the_means_resumes_without_them(runs, tmp_path):
    """The optimizer state has one layout with and without fused_backward: it loads either way."""
    logdir = tmp_path / "logs"
    checkpoint = runs["lean"] / "ckpts" / "myproj-ep00-gs00005"  # an epoch's end
    assert train(run_args(runs["data_root"], logdir, runs["validation_cfg"], "--resume_ckpt", str(checkpoint))) == 0
    log = (newest_run(logdir) / f"{newest_run(logdir).name}.log").read_text()
    assert "Loaded optimizer state" in log and "does not fit" not in log


def test_a_non_finite_gradient_with_fused_backward_stops_without_saving_damaged_weights(runs, tmp_path, capsys):
    logdir = tmp_path / "logs"
    status = train(run_args(runs["data_root"], logdir, runs["validation_cfg"], "--fused_backward", "--lr", "1e12",
                            "--grad_accum", "1"))
    console = "".join(capsys.readouterr())
    assert status == 3
    assert "could not be skipped" in console and "Resume from the last checkpoint" in console
    assert not list(logdir.glob("*/ckpts/*"))


@pytest.mark.parametrize("extra, message", [
    (["--fused_backward", "--clip_grad_norm", "1"], "clip_grad_norm (1, command line) cannot be applied"),
    (["--bf16_weights", "--mixed_precision", "fp16"], "bf16_weights does not work with fp16 mixed precision"),
    (["--vram", "lots"], "key 'vram' is \"lots\""),
])
def test_conflicting_memory_options_stop_before_anything_loads(runs, tmp_path, capsys, extra, message):
    logdir = tmp_path / "logs"
    assert train(run_args(runs["data_root"], logdir, runs["validation_cfg"], *extra)) == 2
    assert message in "".join(capsys.readouterr())
    assert not logdir.exists() or not list(logdir.iterdir())


def test_an_optimizer_with_a_global_step_size_is_refused_for_per_parameter_steps(runs, tmp_path, capsys):
    optimizer = write_json(tmp_path / "optimizer.json", {"base": {"optimizer": "prodigy", "lr": 1.0}})
    logdir = tmp_path / "logs"
    assert train(run_args(runs["data_root"], logdir, runs["validation_cfg"], "--bf16_weights",
                          "--optimizer_config", str(optimizer))) == 2
    console = "".join(capsys.readouterr())
    assert f"{optimizer}: fused_backward and bf16_weights update one weight tensor at a time" in console
    assert "optimizer 'prodigy' computes its step size from all of them together" in console
    assert not logdir.exists() or not list(logdir.iterdir())
