"""Every checkpoint of a run, each deciding itself when it is due: timed, per epoch, on a stop request (a signal or a
failed plugin), after an error, and the final one (REFERENCE §7, doc/TRAINING.md)."""
from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
from safetensors import SafetensorError

from utils.run.checkpoint import EMA_SUFFIX, SaveTimer, checkpoint_name
from utils.plugins import PluginError
from utils.run.interrupts import TrainingDiverged

log = logging.getLogger("train")

PLUGIN_FAILED = 1  # the exit code of a run stopped by a failing plugin


def save_checkpoint(model, opts, args, run, name: str, accelerator, ema_model=None, run_state=None) -> Path:
    """A diffusers folder in the run's ckpts/ and (unless no_save_ckpt) a single .safetensors file; with EMA the
    EMA model beside them as `<name>_ema` and `<name>_ema.safetensors`, written first so that a complete
    checkpoint always has its EMA. `run_state` (utils.run.training_state) makes the checkpoint resumable; it brings
    the optimizer state with it."""
    from utils.model.models import save_diffusers, save_single_file

    unet = accelerator.unwrap_model(model.unet)
    text_encoder = accelerator.unwrap_model(model.text_encoder)

    def save(checkpoint: str, optimizer_states=None, state=None) -> Path:
        folder = run.ckpts / checkpoint
        save_diffusers(model, unet, text_encoder, folder, optimizer_states, state)
        log.info("Saved diffusers model: %s%s", folder, " (resumable)" if state is not None else "")
        if not args.no_save_ckpt:
            file = Path(args.save_ckpt_dir or run.ckpts) / f"{checkpoint}.safetensors"
            save_single_file(model, unet, text_encoder, file, args.save_full_precision)
            log.info("Saved single file: %s", file)
        return folder

    if ema_model is not None:
        with ema_model.swapped_in():
            save(name + EMA_SUFFIX)
    return save(name, opts.state_dicts() if args.save_optimizer or run_state is not None else None, run_state)


class Checkpointer:
    """Saves when a save is due; stops the run on a stop request, with a resumable checkpoint.

    One process decides at every step. Several decide together at the end of each gradient accumulation window,
    so that no process holds gradients the others lack and a resumable checkpoint has none pending: a signal to
    any process or a failed plugin stops all of them, the first process's timer saves for all. The flags travel
    over a gloo group on the CPU, so nothing waits for the GPU. Of several processes the first writes (they all
    hold the same weights)."""

    def __init__(self, args, accelerator, model, opts, run, ema_model=None):
        self.args, self.accelerator, self.model, self.opts, self.run, self.ema = \
            args, accelerator, model, opts, run, ema_model
        self.timer = SaveTimer(args.ckpt_every_n_minutes)
        self.group = torch.distributed.new_group(backend="gloo") if accelerator.num_processes > 1 else None

    # -- events --------------------------------------------------------------------------------------------------

    def training_start(self, trainer) -> None:
        exit_code, _ = self._agree(trainer, window_end=True)
        if exit_code:  # nothing is trained yet: nothing to save
            trainer.exit_code = exit_code

    def epoch_start(self, trainer) -> None:
        self._stop_if_requested(trainer)

    def step_end(self, trainer, batch, out) -> None:
        exit_code, save_due = self._agree(trainer, out.window_end, timed=True)
        if exit_code:
            self._stop(trainer, exit_code)
        elif save_due:
            epoch = trainer.epoch if trainer.phase == "epochs" else 0
            self.save(trainer, checkpoint_name(self.args.project_name, epoch, trainer.global_step),
                      resumable=self.args.save_optimizer and trainer.phase == "epochs")

    def epoch_end(self, trainer) -> None:
        if self._stop_if_requested(trainer):
            return
        done, every = trainer.epoch + 1, self.args.save_every_n_epochs
        if every and done % every == 0 and self.args.save_ckpts_from_n_epochs <= done < self.args.max_epochs:
            self.save(trainer, checkpoint_name(self.args.project_name, done, trainer.global_step),
                      resumable=self.args.save_optimizer)

    def training_end(self, trainer) -> None:
        if self._stop_if_requested(trainer):
            return
        prefix = "" if self.args.no_prepend_last else "last-"
        trainer.final_checkpoint = self.save(trainer, checkpoint_name(
            self.args.project_name, self.args.max_epochs, trainer.global_step, prefix=prefix),
            resumable=self.args.save_optimizer)
        if self.run and trainer.final_checkpoint is None:
            log.error("error: training finished but its final checkpoint could not be saved (see above).")
            trainer.exit_code = 1

    def training_error(self, trainer, error: Exception) -> None:
        """What was trained is kept as errored-... (not resumable: the failed step may have left it half done).
        A plugin's data transform that failed (in the data pipeline, before its batch was trained) stops one process
        cleanly, with a resumable checkpoint."""
        if isinstance(error, PluginError) and self.accelerator.num_processes == 1 and trainer.phase == "epochs":
            trainer.request_stop(PLUGIN_FAILED, str(error))
            self._stop(trainer, PLUGIN_FAILED)
            return
        if not isinstance(error, TrainingDiverged) and not trainer.global_step:
            return
        if not isinstance(error, TrainingDiverged):
            log.exception("Training failed at step %d; saving what was trained as errored-.", trainer.global_step)
        epoch = trainer.epoch if trainer.phase == "epochs" else 0
        folder = self.save(trainer, checkpoint_name(self.args.project_name, epoch, trainer.global_step,
                                                    prefix="errored-"), resumable=False)
        if isinstance(error, TrainingDiverged) and self.run:  # every process diverges at the same step
            log.error("error: %s The weights before those updates are saved in %s.", error,
                      folder or "(nothing: the save failed)")

    # -- saving --------------------------------------------------------------------------------------------------

    def save(self, trainer, name: str, resumable: bool) -> Path | None:
        """A checkpoint; a resumable one also holds the trainer's state. A save that cannot be written (a full
        disk) leaves nothing behind, is reported, and training goes on. Every process calls it; the others than
        the first return None."""
        state = trainer.state_dict() if resumable else None
        if self.run is None:
            return None
        try:
            return save_checkpoint(self.model, self.opts, self.args, self.run, name, self.accelerator, self.ema, state)
        except (OSError, SafetensorError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "writ" not in str(e):  # torch.save's I/O failures are RuntimeErrors
                raise
            log.error("Could not save checkpoint %s: %s. Nothing of it is left behind and earlier checkpoints are "
                      "untouched. Free space in %s; the next save tries again.", name, e, self.run.ckpts)
            return None

    def _stop_if_requested(self, trainer) -> bool:
        exit_code, _ = self._agree(trainer, window_end=True)
        if exit_code:
            self._stop(trainer, exit_code)
        return bool(exit_code)

    def _stop(self, trainer, exit_code: int) -> None:
        resumable = trainer.phase == "epochs"  # reflow is not resumable: the checkpoint holds its weights
        folder = self.save(trainer, f"interrupted-gs{trainer.global_step}", resumable=resumable)
        if trainer.stop_request and self.run:
            log.error("error: %s. Stopped%s; fix the cause, then continue with resume_ckpt findlast.",
                      trainer.stop_request.reason, f" with a resumable checkpoint in {folder}" if folder else "")
        trainer.exit_code = exit_code

    def _agree(self, trainer, window_end: bool, timed: bool = False) -> tuple[int, bool]:
        """(the exit code to stop with, 0 to go on; whether a timed checkpoint is due now)."""
        signals = trainer.signals
        if signals is not None:
            signals.announce()
        signal_number = signal.Signals[signals.received].value if signals and signals.received else 0
        request = trainer.stop_request.exit_code if trainer.stop_request else 0
        if self.group is None:
            return self._exit_code(signal_number, request), timed and self.timer.due()
        if not window_end:
            return 0, False
        flags = torch.tensor([signal_number, request, timed and self.accelerator.is_main_process and self.timer.due()],
                             dtype=torch.int64)
        torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MAX, group=self.group)
        return self._exit_code(int(flags[0]), int(flags[1])), bool(flags[2])

    @staticmethod
    def _exit_code(signal_number: int, request: int) -> int:
        return 128 + signal_number if signal_number else request  # a signal: the shell's convention
