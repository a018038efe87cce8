"""ShapeJudge: scores every sample of the demo's shapes world against its prompt (utils/watch/shape_judge.py) and
logs how often the pictures show what was asked (doc/EVALUATION.md).

At each sample event it logs to TensorBoard `judge/overall`, `judge/<prompt>` and `judge/colour <colour>` (the
share of that event's samples judged correct); at the end of training it prints the first and last event's
scores side by side and writes `before_after.jpg` in the run folder (also in TensorBoard as `judge/before_after`):
one row per prompt, its first sample before training on the left and at the end on the right.

    "plugins": ["utils.plugins.shape_judge.ShapeJudge"]
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from utils.plugins import BasePlugin
from utils.watch.shape_judge import is_correct, parse_prompt

log = logging.getLogger(__name__)


class ShapeJudge(BasePlugin):
    def __init__(self):
        self.first: tuple[int, dict[str, float], dict[str, Image.Image]] | None = None
        self.last: tuple[int, dict[str, float], dict[str, Image.Image]] | None = None

    def on_samples_rendered(self, global_step, label, samples, tb_writer, **kwargs) -> None:
        if label:  # the trained weights' samples only; an EMA's would mix two models in one score
            return
        verdicts: dict[str, list[bool]] = defaultdict(list)
        pictures: dict[str, Image.Image] = {}
        for sample in samples:
            verdict = is_correct(sample.image, sample.prompt)
            if verdict is None:
                continue
            verdicts[sample.prompt].append(verdict)
            pictures.setdefault(sample.prompt, sample.image)
        if not verdicts:
            return
        scores = {prompt: float(np.mean(v)) for prompt, v in verdicts.items()}
        tb_writer.add_scalar("judge/overall", float(np.mean(sum(verdicts.values(), []))), global_step)
        for prompt, score in scores.items():
            tb_writer.add_scalar(f"judge/{prompt}", score, global_step)
        by_colour: dict[str, list[bool]] = defaultdict(list)
        for prompt, v in verdicts.items():
            by_colour[parse_prompt(prompt)[0]] += v
        for colour, v in by_colour.items():
            tb_writer.add_scalar(f"judge/colour {colour}", float(np.mean(v)), global_step)
        event = (global_step, scores, pictures)
        self.first = self.first or event
        self.last = event

    def on_training_end(self, log_folder=None, tb_writer=None, global_step=None, **kwargs) -> None:
        if self.first is None or self.last is self.first:
            return
        (start, before, first_pictures), (end, after, last_pictures) = self.first, self.last
        lines = [f"ShapeJudge: samples judged correct, step {start} -> step {end}:"]
        lines += [f"  {prompt:<24} {before.get(prompt, float('nan')):5.0%} -> {after[prompt]:5.0%}"
                  for prompt in after]
        log.info("\n".join(lines))
        grid = before_after_grid([(first_pictures.get(p), last_pictures[p]) for p in after])
        if log_folder:
            grid.save(Path(log_folder) / "before_after.jpg", quality=92)
        if tb_writer is not None:
            tb_writer.add_image("judge/before_after", np.asarray(grid), global_step, dataformats="HWC")


def before_after_grid(pairs: list[tuple[Image.Image | None, Image.Image]], gap: int = 4) -> Image.Image:
    """Rows of (before, after) images side by side on white; a missing `before` leaves its cell empty."""
    width, height = pairs[0][1].size
    grid = Image.new("RGB", (2 * width + gap, len(pairs) * (height + gap) - gap), "white")
    for row, (before, after) in enumerate(pairs):
        top = row * (height + gap)
        if before is not None:
            grid.paste(before, (0, top))
        grid.paste(after, (width + gap, top))
    return grid
