"""The training loop object (utils.run.loop.Trainer): when each event fires, its counters, gradient-accumulation
windows, stop requests, and the state round trip through a resumable checkpoint. Built through the same set-up as
train.py, on the tiny model, with a recording part on the event path."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_MODEL, write_json
from utils.run import training_state


class Recorder:
    """A part that writes down every event it sees; optionally asks the run to stop at a given point."""

    def __init__(self, stop_at: tuple[str, int] | None = None):
        self.events: list[tuple] = []
        self.stop_at = stop_at

    def _see(self, trainer, event: str, *extra) -> None:
        self.events.append((event, trainer.epoch, trainer.global_step, *extra))
        if self.stop_at == (event, trainer.global_step):
            trainer.request_stop(1, f"test stop at {event}")

    def training_start(self, trainer):
        self._see(trainer, "training_start")

    def epoch_start(self, trainer):
        self._see(trainer, "epoch_start", trainer.steps_in_epoch)

    def step_start(self, trainer, batch):
        self._see(trainer, "step_start", trainer.next_step)

    def step_end(self, trainer, batch, out):
        self._see(trainer, "step_end", trainer.next_step - 1, out.window_end, out.updated, out.images)

    def epoch_end(self, trainer):
        self._see(trainer, "epoch_end", len(trainer.epoch_losses))

    def training_end(self, trainer):
        self._see(trainer, "training_end")

    def named(self, event: str) -> list[tuple]:
        return [e for e in self.events if e[0] == event]


@pytest.fixture
def six_images(tmp_path) -> Path:
    from PIL import Image

    root = tmp_path / "six"
    root.mkdir()
    for i in range(6):
        Image.new("RGB", (64, 64), (40 * i, 100, 200 - 30 * i)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"colour {i}")
    return root


def build(tmp_path: Path, data_root: Path, *flags: str, recorder: Recorder | None = None):
    """A trainer as train.py builds it (3 steps per epoch at batch 2), with `recorder` just before the
    checkpointer, so its stop requests are handled at the same event."""
    from utils.run.build import build_trainer, read_inputs

    optimizer = write_json(tmp_path / "optimizer.json", {"base": {"optimizer": "adamw", "lr": 1e-3,
                                                                  "lr_scheduler": "constant"}})
    trainer = build_trainer(read_inputs([
        "--resume_ckpt", str(TINY_MODEL), "--data_root", str(data_root), "--resolution", "64", "--batch_size", "2",
        "--max_epochs", "2", "--logdir", str(tmp_path / "logs"), "--sample_steps", "0", "--no_save_ckpt",
        "--optimizer_config", str(optimizer), "--log_step", "1", "--seed", "7", *flags]))
    if recorder is not None:
        trainer.parts.insert(len(trainer.parts) - 1, recorder)
    return trainer


def test_events_fire_in_order_with_the_counters_of_their_moment(tmp_path, six_images):
    recorder = Recorder()
    trainer = build(tmp_path, six_images, "--grad_accum", "2", "--project_name", "test", recorder=recorder)
    assert trainer.run() == 0
    names = [e[0] for e in recorder.events]
    epoch = ["epoch_start"] + ["step_start", "step_end"] * 3 + ["epoch_end"]
    assert names == ["training_start"] + epoch * 2 + ["training_end"]
    assert recorder.named("epoch_start") == [("epoch_start", 0, 0, 3), ("epoch_start", 1, 3, 3)]
    # Windows of 2 are aligned to the epoch: the third step closes a shorter window of its own.
    assert [(e[1], e[2], e[3], e[4]) for e in recorder.named("step_end")] == [
        (0, 1, 0, False), (0, 2, 1, True), (0, 3, 2, True), (1, 4, 0, False), (1, 5, 1, True), (1, 6, 2, True)]
    assert all(e[6] == 2 for e in recorder.named("step_end"))  # images per step, one process
    assert recorder.named("epoch_end") == [("epoch_end", 0, 3, 1), ("epoch_end", 1, 6, 2)]
    assert recorder.named("training_end") == [("training_end", 2, 6)]
    assert trainer.final_checkpoint is not None and trainer.final_checkpoint.name == "last-test-ep02-gs00006"
    # EveryDream2's update count with grad_accum 2 over 3-step epochs: two updates per epoch.
    assert trainer.opts.optimizers["unet"].state_dict()["state"][0]["step"].item() == 4


def test_a_stop_request_saves_a_resumable_checkpoint_that_continues_exactly(tmp_path, six_images):
    stopper = Recorder(stop_at=("step_end", 4))
    trainer = build(tmp_path, six_images, "--project_name", "loop", recorder=stopper)
    assert trainer.run() == 1
    assert stopper.events[-1][0] == "step_end" and trainer.global_step == 4
    folder = next((tmp_path / "logs").glob("loop_*/ckpts/interrupted-gs4"))
    state = training_state.load(folder)
    assert (state.epoch, state.step_in_epoch, state.global_step) == (1, 1, 4)
    assert len(state.epoch_losses) == 1 and state.epoch_losses == trainer.epoch_losses
    assert state.grad_accum == 1 and state.steps_since_log == 0  # log_step 1: the log just happened

    resumed_recorder = Recorder()
    resumed = build(tmp_path, six_images, "--project_name", "loop", "--resume_ckpt", "findlast",
                    recorder=resumed_recorder)
    assert resumed.resumed and (resumed.epoch, resumed.next_step, resumed.global_step) == (1, 1, 4)
    assert resumed.epoch_losses == trainer.epoch_losses
    assert torch.equal(resumed.epoch_loss.cpu(), trainer.epoch_loss.cpu())
    again = resumed.state_dict()  # the round trip: what it loaded is what it would save
    assert (again.epoch, again.step_in_epoch, again.global_step, again.epoch_losses) == \
        (state.epoch, state.step_in_epoch, state.global_step, state.epoch_losses)
    assert resumed.run() == 0
    assert [e[0] for e in resumed_recorder.events][:3] == ["training_start", "epoch_start", "step_start"]
    assert resumed_recorder.named("step_start")[0][3] == 1  # the epoch's second step comes first
    assert len(resumed_recorder.named("step_end")) == 2 and resumed.global_step == 6


def test_reflow_steps_come_first_then_every_step_of_the_first_epoch(tmp_path, six_images):
    import json
    import shutil

    v_model = tmp_path / "tiny-v"  # rectified flow starts from a v-prediction model
    shutil.copytree(TINY_MODEL, v_model)
    scheduler_file = v_model / "scheduler" / "scheduler_config.json"
    write_json(scheduler_file, json.loads(scheduler_file.read_text()) | {"prediction_type": "v_prediction"})
    recorder = Recorder()
    trainer = build(tmp_path, six_images, "--resume_ckpt", str(v_model), "--project_name", "reflow", "--max_epochs", "1", "--rectified_flow",
                    "--reflow_steps", "1", "--reflow_gen_batches", "2", "--reflow_sample_steps", "2",
                    "--reflow_train_epochs", "1", recorder=recorder)
    assert trainer.run() == 0
    # 2 generated batches of 2 pairs: 2 reflow steps (indices 0, 1), then the epoch's 3 steps from its start.
    assert [(e[1], e[2], e[3]) for e in recorder.named("step_start")] == [
        (0, 0, 0), (0, 1, 1), (0, 2, 0), (0, 3, 1), (0, 4, 2)]
    assert recorder.named("epoch_end") == [("epoch_end", 0, 5, 1)]


def test_a_stop_asked_for_before_training_saves_nothing(tmp_path, six_images):
    trainer = build(tmp_path, six_images, "--project_name", "early", recorder=Recorder(stop_at=("training_start", 0)))
    assert trainer.run() == 1
    assert trainer.global_step == 0
    assert not list((tmp_path / "logs").glob("early_*/ckpts/*"))


def test_a_stop_asked_for_at_an_epoch_end_resumes_at_the_next_epoch(tmp_path, six_images):
    trainer = build(tmp_path, six_images, "--project_name", "edge", "--max_epochs", "3",
                    recorder=Recorder(stop_at=("epoch_end", 3)))
    assert trainer.run() == 1
    state = training_state.load(next((tmp_path / "logs").glob("edge_*/ckpts/interrupted-gs3")))
    assert (state.epoch, state.step_in_epoch, state.global_step) == (1, 0, 3)


def test_epoch_saves_follow_their_cadence(tmp_path, six_images):
    trainer = build(tmp_path, six_images, "--project_name", "cadence", "--max_epochs", "4",
                    "--save_every_n_epochs", "2", "--save_optimizer")
    assert trainer.run() == 0
    saved = sorted(p.name for p in (tmp_path / "logs").glob("cadence_*/ckpts/*"))
    assert saved == ["cadence-ep02-gs00006", "last-cadence-ep04-gs00012"]
    # save_optimizer makes them resumable, at the start of the epoch that follows
    state = training_state.load(next((tmp_path / "logs").glob("cadence_*/ckpts/cadence-ep02-gs00006")))
    assert (state.epoch, state.step_in_epoch, state.global_step) == (2, 0, 6)


def test_train_py_reads_top_to_bottom():
    """The shape the loop object exists for: main() is short, with no nested functions or shared counters."""
    import ast

    tree = ast.parse((REPO / "train.py").read_text())
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 60
    assert not [n for n in ast.walk(main) if n is not main and isinstance(n, (ast.FunctionDef, ast.Nonlocal, ast.Global))]
    loop = ast.parse((REPO / "utils" / "run" / "loop.py").read_text())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(loop)
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 80]
    assert not long


def test_a_finished_run_resumed_starts_a_new_run_from_its_weights(tmp_path, six_images):
    """EveryDream2's chaining: the next link resumes the last link's final checkpoint with the same settings; a
    run that is already done is not continued (it would train nothing) but started anew from its weights."""
    first = build(tmp_path, six_images, "--project_name", "chain", "--save_optimizer")
    assert first.run() == 0 and first.final_checkpoint.name == "last-chain-ep02-gs00006"
    assert training_state.load(first.final_checkpoint).epoch == 2
    second = build(tmp_path, six_images, "--project_name", "chain", "--resume_ckpt", str(first.final_checkpoint))
    assert not second.resumed and (second.epoch, second.global_step) == (0, 0)
    assert second.run() == 0 and second.global_step == 6


def test_a_stop_signal_is_announced_by_the_loop_not_inside_the_handler(caplog):
    """A signal handler runs wherever the main thread was, maybe inside a console write: a log record made there
    can fail as a reentrant write and lose the message. The handler only records the signal; the loop's next check
    announces it, once."""
    import logging
    import os
    import signal

    from utils.run.interrupts import StopSignals

    with caplog.at_level(logging.WARNING), StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == "SIGTERM" and not caplog.records
        signals.announce()
        signals.announce()
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["SIGTERM received"]
    assert "stopping after this step and saving a resumable checkpoint" in caplog.records[0].getMessage()
    assert signals.exit_code == 143
