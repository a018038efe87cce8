"""The training loop: one object that owns the run's counters and state and calls every part of the run through
one event path (doc/ARCHITECTURE.md).

A part is any object with some of the event methods below, each taking the trainer first:

    training_start(trainer)                      once, before the first step (also when resuming)
    epoch_start(trainer)                         before an epoch's batches are planned
    step_start(trainer, batch)                   before each step
    step_end(trainer, batch, out: StepOutput)    after each step (reflow's too)
    samples_rendered(trainer, step, label, samples)  after a sample event drew one model's images (label "" for
                                                 the trained weights, "ema"): RenderedSample each
    reflow_iteration_end(trainer)                after each reflow iteration
    epoch_end(trainer)                           after each epoch
    training_end(trainer)                        after the last epoch
    training_error(trainer, error)               the run failed with an exception (a part that handles it sets
                                                 exit_code; otherwise it is raised)

Parts decide their own timing from the trainer's counters (a checkpointer saves when its clock or the epoch says
so, metrics log every log_step). A part stops the run by setting `trainer.exit_code`; one that wants the run to stop
at the next safe point (a plugin that failed) calls `trainer.request_stop`. `state_dict()` / `load_state_dict()` are
the one place where a resumable checkpoint's training state is made and read; parts with state of their own add it
through theirs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable

import torch
from tqdm.auto import tqdm

from optimizer.optimizers import NonFiniteFusedUpdate
from utils.objective.step import StepSettings, training_step
from utils.run import training_state
from utils.run.interrupts import StopSignals, TrainingDiverged

log = logging.getLogger("train")

EXIT_OK, EXIT_FAILED, EXIT_DIVERGED, EXIT_KEYBOARD = 0, 1, 3, 130


@dataclass
class StepOutput:
    loss: torch.Tensor  # this process's loss of the batch, detached, on the device
    grad_norms: dict  # model name -> gradient norm, at an applied update
    window_end: bool  # the step closed a gradient-accumulation window, so an update was due
    updated: bool  # the due update was applied (False: its gradients were not finite)
    images: int  # images trained in this step by all processes together


@dataclass
class StopRequest:
    exit_code: int
    reason: str


class Trainer:
    """Owns the counters and the run's state; `run()` trains and returns the exit code."""

    def __init__(self, *, args, accelerator, model, noise_scheduler, trained, opts, data, fingerprint, run,
                 parts: list, reflow=None):
        self.args, self.accelerator, self.model, self.noise_scheduler = args, accelerator, model, noise_scheduler
        self.trained, self.opts, self.data, self.fingerprint, self.run_dir = trained, opts, data, fingerprint, run
        self.parts, self.reflow = parts, reflow
        self.step_settings = StepSettings.from_args(args)
        self.grad_accum = args.grad_accum  # a plugin may change it between epochs
        self.phase = "epochs"  # "reflow" while the reflow phase trains
        self.resumed = False
        self.global_step = 0  # steps done
        self.epoch = 0  # the epoch being trained
        self.next_step = 0  # the next step's index within the epoch
        self.steps_in_epoch = 0
        self.epoch_ended = False  # the epoch's end is being handled: a save now resumes at the next epoch
        self.epoch_loss = torch.zeros((), device=accelerator.device)
        self.epoch_losses: list[float] = []
        self.skipped_updates = self.skipped_in_a_row = 0
        self.stop_request: StopRequest | None = None
        self.exit_code: int | None = None
        self.signals: StopSignals | None = None
        self.steps_bar = None
        self.final_checkpoint = None

    # -- the run -------------------------------------------------------------------------------------------------

    def run(self) -> int:
        started = time.perf_counter()
        with StopSignals() as self.signals:
            try:
                self._train()
            except KeyboardInterrupt:
                log.warning("Stopped at once, without saving.")
                self.exit_code = EXIT_KEYBOARD
            except TrainingDiverged as error:
                self.emit("training_error", error=error)
                self.exit_code = EXIT_DIVERGED
            except NonFiniteFusedUpdate as error:  # the weights are damaged: nothing is saved from them
                log.error("error: training stopped at step %d: %s", self.global_step + 1, error)
                self.exit_code = EXIT_DIVERGED
            except Exception as error:
                self.emit("training_error", error=error)
                if self.exit_code is None:  # no part could stop the run cleanly on it
                    self._close(EXIT_FAILED)
                    raise
        if self.exit_code is None and self.run_dir:  # before the run's log file closes, so that it says so too
            log.info("Done: %d steps in %.1f min. Epoch loss %.4f -> %.4f. Final model: %s. TensorBoard: "
                     "tensorboard --logdir %s", self.global_step, (time.perf_counter() - started) / 60,
                     self.epoch_losses[0], self.epoch_losses[-1], self.final_checkpoint, self.args.logdir)
        if self.exit_code is None:
            self.exit_code = EXIT_OK
        self._close(self.exit_code)
        if self.exit_code in (EXIT_OK, EXIT_FAILED) and self.epoch == self.args.max_epochs:
            self.accelerator.wait_for_everyone()  # the processes leave their process group together
            self.accelerator.end_training()
        return self.exit_code

    def _train(self) -> None:
        self.emit("training_start")
        if self.reflow is not None and not self.resumed and not self.stopped:
            self.reflow.run_phase(self)
            self.next_step = 0  # reflow counted its own passes' steps; the first epoch starts at its beginning
        start_epoch, first_step = self.epoch, self.next_step
        epochs_bar = tqdm(range(start_epoch, self.args.max_epochs), desc="epochs", unit="ep", dynamic_ncols=True,
                          initial=start_epoch, total=self.args.max_epochs,
                          disable=not self.accelerator.is_main_process)
        for epoch in epochs_bar:
            if self.stopped:
                return
            self.epoch, self.next_step = epoch, first_step if epoch == start_epoch else 0
            self.epoch_ended = False
            self._train_epoch()
            if self.epoch_losses and not self.stopped:
                epochs_bar.set_postfix(loss=f"{self.epoch_losses[-1]:.4f}")
        if not self.stopped:
            self.epoch, self.next_step, self.steps_in_epoch = self.args.max_epochs, 0, 0
            self.epoch_ended = False
            self.emit("training_end")

    def _train_epoch(self) -> None:
        accum_before = self.grad_accum
        plan = self.data.plan(self.epoch, self.grad_accum)
        self.steps_in_epoch = len(plan)
        self.emit("epoch_start")
        if self.stopped:
            return
        if self.grad_accum != accum_before:
            plan = self.data.plan(self.epoch, self.grad_accum)
            self.steps_in_epoch = len(plan)
        if self.args.write_schedule and self.run_dir:  # the whole plan: every process's slots
            self.data.write_schedule(self.run_dir.path / f"ep{self.epoch}_batch_schedule.txt", plan, self.epoch)
        self.steps_bar = tqdm(self.data.loader(plan, self.epoch, self.next_step), desc=f"epoch {self.epoch}",
                              unit="step", leave=False, dynamic_ncols=True, initial=self.next_step, total=len(plan),
                              disable=not self.accelerator.is_main_process)
        self.train_steps(enumerate(self.steps_bar, start=self.next_step), len(plan), self.epoch_loss)
        if self.stopped:
            return
        self.epoch_losses.append((self.accelerator.reduce(self.epoch_loss, "mean") / max(1, len(plan))).item())
        self.epoch_loss.zero_()
        self.epoch_ended = True
        self.emit("epoch_end")

    def train_steps(self, steps: Iterable[tuple[int, dict]], steps_in_epoch: int, loss_sum: torch.Tensor) -> None:
        """Trains on (index in epoch, batch) pairs until they end or a part stops the run; adds each batch's loss
        to `loss_sum`. The main epochs and reflow's training passes both train through here."""
        for local_step, batch in steps:
            self.emit("step_start", batch=batch)
            out = self.step(batch, local_step, steps_in_epoch)
            loss_sum += out.loss
            self.next_step = local_step + 1
            self.emit("step_end", batch=batch, out=out)
            if self.stopped:
                return

    def step(self, batch: dict, local_step: int, steps_in_epoch: int) -> StepOutput:
        """One batch: forward, backward, and at the end of its gradient-accumulation window the optimizer update."""
        # Windows are aligned to the epoch; the last one may be shorter.
        window_start = local_step - local_step % self.grad_accum
        window = min(self.grad_accum, steps_in_epoch - window_start)
        window_end = local_step == window_start + window - 1
        loss, grad_norms, updated = training_step(self.model, self.noise_scheduler, batch, self.step_settings,
                                                  self.accelerator, self.opts, window=window, update=window_end,
                                                  clip_grad_norm=self.args.clip_grad_norm)
        if window_end:
            self._count_update(updated)
        self.global_step += 1
        return StepOutput(loss, grad_norms, window_end, updated,
                          batch["input_ids"].shape[0] * self.accelerator.num_processes)

    def _count_update(self, updated: bool) -> None:
        if updated:
            self.skipped_in_a_row = 0
            return
        self.skipped_updates, self.skipped_in_a_row = self.skipped_updates + 1, self.skipped_in_a_row + 1
        # fp16's grad scaler overflows now and then by design; anywhere else a skip deserves attention.
        log.log(logging.INFO if self.accelerator.scaler is not None else logging.WARNING, "Step %d: gradients not "
                "finite; update skipped (%d in a row).", self.global_step + 1, self.skipped_in_a_row)
        if self.skipped_in_a_row >= self.args.max_skipped_updates:
            raise TrainingDiverged(self.global_step + 1, self.skipped_in_a_row)

    # -- the event path ------------------------------------------------------------------------------------------

    def emit(self, event: str, **kwargs) -> None:
        for part in self.parts:
            handler = getattr(part, event, None)
            if handler is not None:
                handler(self, **kwargs)

    def request_stop(self, exit_code: int, reason: str) -> None:
        """Stop at the next point where a resumable checkpoint can be saved (the checkpointer saves it)."""
        if self.stop_request is None:
            self.stop_request = StopRequest(exit_code, reason)

    @property
    def stopped(self) -> bool:
        return self.exit_code is not None

    def _close(self, exit_code: int) -> None:
        if self.run_dir:
            self.run_dir.close(exit_code)

    # -- state ---------------------------------------------------------------------------------------------------

    def position(self) -> tuple[int, int]:
        """(epoch, step within it) of what comes next; once an epoch's end is handled, the next epoch's start. A
        save after an epoch's last step but before its end resumes there, so the epoch's end is not skipped."""
        if self.epoch_ended:
            return self.epoch + 1, 0
        return self.epoch, self.next_step

    def state_dict(self) -> training_state.TrainingState:
        """Where the run stands after its last step: everything needed to continue exactly from there. Every
        process calls it at the same step: the loss sums are averaged over the processes."""
        epoch, step = self.position()
        state = training_state.TrainingState(
            epoch=epoch, step_in_epoch=step, global_step=self.global_step, fingerprint=self.fingerprint,
            rng=training_state.capture_rng(),
            schedules={name: s.state_dict() for name, s in self.opts.schedules.items()},
            scaler=self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
            pending_grads=training_state.pending_gradients(self.trained),
            epoch_loss_sum=float(self.accelerator.reduce(self.epoch_loss, "mean")),
            epoch_losses=list(self.epoch_losses), skipped_updates=self.skipped_updates, grad_accum=self.grad_accum)
        for part in self.parts:
            if hasattr(part, "state_dict"):
                for key, value in part.state_dict().items():
                    setattr(state, key, value)
        return state

    def load_state_dict(self, state: training_state.TrainingState) -> None:
        """Continues the run saved in `state` (after the models, optimizers and parts are built)."""
        self.resumed = True
        self.epoch, self.next_step, self.global_step = state.epoch, state.step_in_epoch, state.global_step
        self.grad_accum = state.grad_accum or self.grad_accum
        self.epoch_loss += state.epoch_loss_sum
        self.epoch_losses, self.skipped_updates = list(state.epoch_losses), state.skipped_updates
        for name, schedule in self.opts.schedules.items():
            schedule.load_state_dict(state.schedules[name])
        if self.accelerator.scaler is not None and state.scaler is not None:
            self.accelerator.scaler.load_state_dict(state.scaler)
        training_state.restore_gradients(self.trained, state.pending_grads)
        for part in self.parts:
            if hasattr(part, "load_state_dict"):
                part.load_state_dict(state)
        training_state.restore_rng(state.rng)
