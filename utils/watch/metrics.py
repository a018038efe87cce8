"""The run's scalars in TensorBoard: the loss every log_step steps and per epoch, learning rates, speed, skipped
updates, grad scale, GPU memory and gradient norms (tags as EveryDream2's where it has them; doc/TRAINING.md)."""
from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("train")


class Metrics:
    """Logs from the trainer's counters and each step's output; the first process writes. Every process takes
    part in the loss averages, which are exchanged between processes."""

    def __init__(self, args, accelerator, opts, run, memory_plan=None):
        self.args, self.accelerator, self.opts, self.memory_plan = args, accelerator, opts, memory_plan
        self.tb = run.tb if run else None
        self.loss_since_log = torch.zeros((), device=accelerator.device)
        self.steps_since_log = self.images_since_log = 0
        self.last_log_time = self.epoch_start_time = time.perf_counter()

    def epoch_start(self, trainer) -> None:
        self.epoch_start_time = time.perf_counter()

    def step_end(self, trainer, batch, out) -> None:
        self.images_since_log += out.images
        self.loss_since_log.add_(out.loss)
        self.steps_since_log += 1
        if trainer.global_step % self.args.log_step:
            return
        elapsed = time.perf_counter() - self.last_log_time
        mean_loss = (self.accelerator.reduce(self.loss_since_log, "mean") / self.steps_since_log).item()
        if self.tb is not None:
            self._write(trainer.global_step, mean_loss, self.images_since_log / elapsed, out.grad_norms,
                        trainer.skipped_updates, trainer.steps_bar)
        self.last_log_time, self.images_since_log = time.perf_counter(), 0
        self.loss_since_log.zero_()
        self.steps_since_log = 0

    def _write(self, step: int, mean_loss: float, images_per_second: float, grad_norms: dict, skipped: int, bar):
        lrs = self.opts.current_lrs()
        self.tb.add_scalar("loss/log_step", mean_loss, step)
        self.tb.add_scalar("hyperparameter/lr unet", lrs.get("unet", 0.0), step)
        self.tb.add_scalar("hyperparameter/lr text encoder", lrs.get("text_encoder", 0.0), step)
        self.tb.add_scalar("performance/images per second", images_per_second, step)
        self.tb.add_scalar("optimizer/skipped_updates", skipped, step)
        if self.accelerator.scaler is not None:
            self.tb.add_scalar("hyperparameter/grad scale", self.accelerator.scaler.get_scale(), step)
        if torch.cuda.is_available():
            self.tb.add_scalar("performance/vram", torch.cuda.max_memory_allocated() / 2**20, step)
            self.tb.add_scalar("performance/vram peak reserved GiB", torch.cuda.max_memory_reserved() / 2**30, step)
        for name, norm in grad_norms.items():
            self.tb.add_scalar(f"optimizer/{'te' if name == 'text_encoder' else name}_grad_norm", norm.item(), step)
        if bar is not None:
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lrs.get('unet', lrs.get('text_encoder')):.2e}",
                            img_s=f"{images_per_second:.1f}")

    def epoch_end(self, trainer) -> None:
        if self.tb is not None:
            self.tb.add_scalar("loss/epoch", trainer.epoch_losses[-1], trainer.global_step)
            self.tb.add_scalar("performance/minutes per epoch", (time.perf_counter() - self.epoch_start_time) / 60,
                               trainer.global_step)

    def training_end(self, trainer) -> None:
        """The whole run's measured peak beside the memory plan's estimate (doc/MEMORY.md)."""
        if self.memory_plan is None or self.tb is None:
            return
        peak, estimated = torch.cuda.max_memory_reserved() / 2**30, self.memory_plan.estimate.peak / 2**30
        self.tb.add_scalar("performance/vram plan estimate GiB", estimated, trainer.global_step)
        self.tb.add_scalar("performance/vram peak reserved GiB", peak, trainer.global_step)
        log.info("Memory: peak %.2f GiB reserved in this process; the plan estimated %.2f GiB (%+.0f%%).", peak,
                   estimated, 100 * (estimated / peak - 1) if peak else 0)

    def state_dict(self) -> dict:
        return {"loss_since_log_sum": float(self.accelerator.reduce(self.loss_since_log, "mean")),
                "steps_since_log": self.steps_since_log}

    def load_state_dict(self, state) -> None:
        self.loss_since_log += state.loss_since_log_sum
        self.steps_since_log = state.steps_since_log
