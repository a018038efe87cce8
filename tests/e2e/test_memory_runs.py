"""train.py runs with the memory means (doc/MEMORY.md): the optimizer step fused into the backward pass trains the
same weights; bf16 weights with stochastic rounding resume bit for bit; conflicting options stop before loading."""
from __future__ import annotations

import pytest
import torch

from tests.e2e.test_resume import assert_same_weights, newest_run, run_args, train, weights
from tests.conftest import write_json
from utils.run import training_state

FINAL = "last-myproj-ep02-gs00010"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """10 images (8 trained, 2 validation), batch 2, grad_accum 2, EMA: trained plainly, with fused_backward, and
    with fused_backward + bf16_weights saving a resumable checkpoint after every step."""
    from PIL import Image

    root = tmp_path_factory.mktemp("memory")
    data_root = root / "images"
    data_root.mkdir()
    for i in range(10):
        Image.new("RGB", (64, 64) if i < 7 else (96, 64), (20 * i, 200 - 15 * i, 90)).save(data_root / f"{i}.png")
        (data_root / f"{i}.txt").write_text(f"a square of colour {i}, plain")
    validation_cfg = write_json(root / "validation.json", {"val_split_mode": "automatic", "auto_split_proportion": 0.2,
                                                            "every_n_epochs": 0.5, "seed": 3})
    folders = {}
    for name, extra in (("plain", []), ("fused", ["--fused_backward"]),
                        ("lean", ["--fused_backward", "--bf16_weights", "--ckpt_every_n_minutes", "1e-9"])):
        logdir = root / name
        assert train(run_args(data_root, logdir, validation_cfg, *extra)) == 0
        folders[name] = newest_run(logdir)
    return dict(data_root=data_root, validation_cfg=validation_cfg, **folders)


def test_fused_backward_trains_the_same_weights_and_ema_as_the_plain_step(runs):
    """On the CPU in fp32 each parameter's own AdamW step inside the backward pass is the same arithmetic as one
    AdamW over all of them after it, grad_accum windows included (the hooks update at a window's last step)."""
    assert_same_weights(runs["fused"] / "ckpts" / FINAL, runs["plain"] / "ckpts" / FINAL)
    assert_same_weights(runs["fused"] / "ckpts" / f"{FINAL}_ema", runs["plain"] / "ckpts" / f"{FINAL}_ema")


def test_bf16_weights_train_in_bf16_and_a_resumed_run_ends_on_the_same_weights(runs, tmp_path):
    lean = runs["lean"] / "ckpts"
    final = weights(lean / FINAL)
    assert {t.dtype for t in final.values()} == {torch.bfloat16}  # saved as trained
    plain = weights(runs["plain"] / "ckpts" / FINAL)
    start = weights(lean / "myproj-ep00-gs00001")
    moved = [k for k in final if not torch.equal(final[k], start[k])]
    assert len(moved) > 0.9 * len(final)  # updates far below bf16's spacing still move the weights
    closeness = [torch.nn.functional.cosine_similarity((final[k].float() - start[k].float()).flatten(),
                                                       (plain[k] - start[k].float()).flatten(), dim=0)
                 for k in moved if final[k].numel() > 1000]
    assert float(torch.stack(closeness).mean()) > 0.5  # they move the way the fp32 run moved
    ema = weights(lean / f"{FINAL}_ema")
    assert {t.dtype for t in ema.values()} == {torch.float32}  # the average keeps fp32
    checkpoint = lean / "myproj-ep00-gs00003"  # inside a grad_accum window
    assert training_state.load(checkpoint).pending_grads["unet"]
    assert (checkpoint / "optimizer_stochastic_rounding.pt").is_file()
    logdir = tmp_path / "logs"
    assert train(run_args(runs["data_root"], logdir, runs["validation_cfg"], "--fused_backward", "--bf16_weights",
                          "--resume_ckpt", str(checkpoint))) == 0
    resumed = newest_run(logdir)
    assert "Resuming the run of" in (resumed / f"{resumed.name}.log").read_text()
    assert_same_weights(resumed / "ckpts" / FINAL, lean / FINAL)
    assert_same_weights(resumed / "ckpts" / f"{FINAL}_ema", lean / f"{FINAL}_ema")


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
    assert "optimizer 'prodigy' computes its step size from all of them together" in "".join(capsys.readouterr())
    assert not logdir.exists() or not list(logdir.iterdir())
