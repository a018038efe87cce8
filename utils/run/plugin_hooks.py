"""EveryDream2's plugin hooks on the loop's events, with its keyword arguments and counts (doc/PLUGINS.md)."""
from __future__ import annotations

import logging
from types import SimpleNamespace

from utils.plugins import PluginError, PluginRunner
from utils.run.checkpointer import PLUGIN_FAILED

log = logging.getLogger("train")


class PluginHooks:
    """The loop's part that calls the plugins. Event hooks run in the first process; a grad_accum change a plugin
    makes (arg_update_callback) is handed to the other processes. Plugin step hooks run in the main epochs, not
    during reflow. A hook that raises asks the run to stop with a resumable checkpoint."""

    def __init__(self, runner: PluginRunner, args, accelerator, run, model, noise_scheduler, ema_model=None):
        self.runner, self.args, self.accelerator, self.model = runner, args, accelerator, model
        self.noise_scheduler, self.ema = noise_scheduler, ema_model
        self.log_folder = str(run.path) if run else None
        self.tb_writer = run.tb if run else None

    def training_start(self, trainer) -> None:
        self._call(trainer, "on_training_start", log_folder=self.log_folder, project_name=self.args.project_name)

    def epoch_start(self, trainer) -> None:
        self._call(trainer, "on_epoch_start", epoch=trainer.epoch, global_step=trainer.global_step,
                   epoch_length=trainer.steps_in_epoch, **self._places(), arg_update_callback=self._updater(trainer))
        self._share_grad_accum(trainer)

    def step_start(self, trainer, batch) -> None:
        if trainer.phase == "epochs":
            self._call(trainer, "on_step_start", epoch=trainer.epoch, local_step=trainer.next_step,
                       global_step=trainer.global_step, project_name=self.args.project_name,
                       log_folder=self.log_folder, batch=self._batch(batch), ed_state=self._ed_state(trainer))

    def step_end(self, trainer, batch, out) -> None:
        if trainer.phase == "epochs":  # EveryDream2 calls it before counting the step: its 0-based number
            self._call(trainer, "on_step_end", epoch=trainer.epoch, global_step=trainer.global_step - 1,
                       local_step=trainer.next_step - 1, **self._places(), batch=self._batch(batch),
                       ed_state=self._ed_state(trainer))

    def epoch_end(self, trainer) -> None:
        self._call(trainer, "on_epoch_end", epoch=trainer.epoch, global_step=trainer.global_step, **self._places(),
                   arg_update_callback=self._updater(trainer))
        self._share_grad_accum(trainer)

    def samples_rendered(self, trainer, step, label, samples) -> None:
        self._call(trainer, "on_samples_rendered", global_step=step, label=label, samples=samples,
                   tb_writer=self.tb_writer, log_folder=self.log_folder)

    def training_end(self, trainer) -> None:
        self._call(trainer, "on_training_end", global_step=trainer.global_step, log_folder=self.log_folder,
                   tb_writer=self.tb_writer)

    def _call(self, trainer, hook: str, **kwargs) -> None:
        if not self.accelerator.is_main_process or trainer.stop_request:
            return
        try:
            self.runner.call(hook, **kwargs)
        except PluginError as error:
            log.error("error: %s", error, exc_info=error.original)
            trainer.request_stop(PLUGIN_FAILED, f"plugin {error.plugin} failed in {error.hook}")

    def _places(self) -> dict:
        return {"project_name": self.args.project_name, "log_folder": self.log_folder,
                "data_root": self.args.data_root}

    @staticmethod
    def _updater(trainer):
        def update_arg(name: str, value) -> None:
            if name != "grad_accum":
                raise ValueError(f"arg_update_callback: only 'grad_accum' can be changed by a plugin, not {name!r}.")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"arg_update_callback: grad_accum must be a whole number of at least 1, not "
                                 f"{value!r}.")
            if value != trainer.grad_accum:
                log.info("Plugin set grad_accum %d -> %d (from epoch %d on).", trainer.grad_accum, value,
                         trainer.position()[0])
            trainer.grad_accum = value
        return update_arg

    def _share_grad_accum(self, trainer) -> None:
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            trainer.grad_accum = broadcast_object_list([trainer.grad_accum])[0]

    @staticmethod
    def _batch(batch: dict) -> dict:
        """Our batch with EveryDream2's names beside ours (image is None where the latent cache had them all)."""
        return {**batch, "image": batch.get("pixel_values"), "tokens": batch["input_ids"]}

    def _ed_state(self, trainer) -> SimpleNamespace:
        unwrap = self.accelerator.unwrap_model
        return SimpleNamespace(optimizer=trainer.opts, train_batch=trainer.data, unet=unwrap(self.model.unet),
                               text_encoder=unwrap(self.model.text_encoder), tokenizer=self.model.tokenizer,
                               scheduler=self.noise_scheduler, vae=self.model.vae, unet_ema=None,
                               text_encoder_ema=None)
