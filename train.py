"""Fine-tune Stable Diffusion 1.x / 2.x: `python train.py --config cfgs/train.json [--flag value ...]`.

Read the options and check every input the user gave, build the run (model, run folder, optimizers, EMA and the
loop's parts), run it, and return its exit code (doc/ARCHITECTURE.md):

    0    trained to the end, final checkpoint saved
    1    a plugin failed (a resumable checkpoint is saved), the final checkpoint could not be written, or an
         unexpected error (what was trained is saved as errored-...)
    2    a problem with the options, data or model files, reported before anything is trained
    3    the gradients stayed non-finite for max_skipped_updates updates in a row (errored-... saved)
    128 + N   stopped by signal N (SIGINT 130, SIGTERM 143) after saving a resumable checkpoint
    130  a second Ctrl-C: stopped at once, without saving
"""
from __future__ import annotations

import logging
import sys

from utils.run.build import START_ERRORS, build_trainer, read_inputs
from utils.run.run_dir import setup_console_logging

log = logging.getLogger("train")


def main(argv: list[str] | None = None) -> int:
    setup_console_logging()
    try:
        inputs = read_inputs(argv)  # every user error surfaces here, before a model loads or a folder is made
        trainer = build_trainer(inputs)  # model, run folder, optimizers, EMA, samples, validation, plugins, saves
    except START_ERRORS as e:
        log.error("error: %s", e)
        return 2
    return trainer.run()


if __name__ == "__main__":
    sys.exit(main())
