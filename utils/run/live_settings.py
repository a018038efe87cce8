"""load_settings_every_epoch: the --config file re-read at every epoch start; its live options apply from that epoch
(REFERENCE §8.3, doc/TRAINING.md)."""
from __future__ import annotations

import logging

from utils.objective.step import StepSettings
from utils.options import config

log = logging.getLogger("train")


class LiveSettings:
    """The loop's part that reloads the live options. The first process reads the file and hands the options to
    the others, so every process trains with the same settings even if the file changes between their reads. With
    several processes training the text encoder, clip_skip keeps its starting value (which text encoder layers
    train is fixed when DistributedDataParallel wraps it)."""

    def __init__(self, args, accelerator, max_clip_skip: int, text_encoder_trained: bool):
        self.args, self.accelerator = args, accelerator
        self.max_clip_skip, self.text_encoder_trained = max_clip_skip, text_encoder_trained

    def epoch_start(self, trainer) -> None:
        if not (self.args.load_settings_every_epoch and self.args.config):
            return
        changes, warnings = self._reload()
        for line in changes:
            log.info("Epoch %d: settings changed: %s", trainer.epoch, line)
        for line in warnings:
            log.warning("Epoch %d: %s", trainer.epoch, line)
        trainer.step_settings = StepSettings.from_args(self.args)

    def _reload(self) -> tuple[list[str], list[str]]:
        from accelerate.utils import broadcast_object_list

        args, several = self.args, self.accelerator.num_processes > 1
        changes, warnings = [], []
        if self.accelerator.is_main_process:
            clip_skip = args.clip_skip
            changes, warnings = config.reload_live_settings(args, self.max_clip_skip)
            if several and self.text_encoder_trained and args.clip_skip != clip_skip:
                changes = [line for line in changes if f": clip_skip {clip_skip} -> " not in line]
                warnings.append(f"clip_skip stays {clip_skip}: with several processes training the text encoder, "
                                "which of its layers train is fixed at the start. Restart from a checkpoint to "
                                "change it.")
                args.clip_skip = clip_skip
        if several:
            live = broadcast_object_list([{key: getattr(args, key) for key in config.LIVE_KEYS}])[0]
            for key, value in live.items():
                setattr(args, key, value)
        return changes, warnings
