"""Example plugins to copy and adapt (doc/PLUGINS.md).

ExampleLoggingPlugin: logs each event hook and the names of its keyword arguments (EveryDream2's
    plugins.example_plugin.ExampleLoggingPlugin resolves to it).
ReplaceWordsAndGrade: rewrites words in captions and adjusts image gamma and saturation; change the class
    attributes (or subclass it in your own file and set them there).
"""
from __future__ import annotations

import logging
import re

from PIL import Image, ImageEnhance

from utils.plugins import BasePlugin

log = logging.getLogger(__name__)


class ExampleLoggingPlugin(BasePlugin):
    """Logs every event hook with the names of the keyword arguments it received."""

    def _log(self, hook: str, kwargs: dict) -> None:
        log.info("ExampleLoggingPlugin: %s(%s)", hook, ", ".join(kwargs))

    def on_training_start(self, **kwargs):
        self._log("on_training_start", kwargs)

    def on_training_end(self, **kwargs):
        self._log("on_training_end", kwargs)

    def on_epoch_start(self, **kwargs):
        self._log("on_epoch_start", kwargs)

    def on_epoch_end(self, **kwargs):
        self._log("on_epoch_end", kwargs)

    def on_step_start(self, **kwargs):
        self._log("on_step_start", kwargs)

    def on_step_end(self, **kwargs):
        self._log("on_step_end", kwargs)

    def on_samples_rendered(self, **kwargs):
        self._log("on_samples_rendered", kwargs)


class ReplaceWordsAndGrade(BasePlugin):
    """Captions: each whole word in WORDS (any case) is replaced by its value. Images: gamma, then
    saturation. Deterministic: the same caption or image always gives the same result, so the batch
    schedule (write_schedule) shows exactly what trains.

    Because it changes images, the latent cache is off while it is loaded.
    """

    # whole words, matched in any case -> replacement text ("" removes the word)
    WORDS: dict[str, str] = {"pic": "photo", "img": "image", "bw": "black and white"}
    # output = input ** GAMMA on 0..1 values: below 1 brightens the mid-tones, above 1 darkens them
    GAMMA: float = 0.9
    # 1.0 keeps colours, 0.0 is greyscale, above 1 is more saturated
    SATURATION: float = 1.1

    def __init__(self):
        if self.GAMMA <= 0 or self.SATURATION < 0:
            raise ValueError(f"GAMMA must be > 0 and SATURATION >= 0; got {self.GAMMA}, {self.SATURATION}")
        words = sorted(self.WORDS, key=len, reverse=True)   # longest first, so "bw photo" wins over "bw"
        self._pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE) \
            if words else None
        self._replacement = {w.lower(): r for w, r in self.WORDS.items()}
        self._lut = [round(255 * (v / 255) ** self.GAMMA) for v in range(256)] * 3

    def transform_caption(self, caption: str) -> str:
        if self._pattern is None:
            return caption
        text = self._pattern.sub(lambda m: self._replacement[m.group(0).lower()], caption)
        return " ".join(text.split())   # a removed word leaves no double space

    def transform_pil_image(self, img: Image.Image) -> Image.Image:
        if self.GAMMA != 1.0:
            img = img.point(self._lut)
        if self.SATURATION != 1.0:
            img = ImageEnhance.Color(img).enhance(self.SATURATION)
        return img
