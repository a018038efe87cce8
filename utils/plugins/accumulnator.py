"""Accumulnator: EveryDream2's grad_accum ramp, one value per epoch (REFERENCE §8.2).

Config: plugins/accumulnator.json in the directory training starts from if it exists (where EveryDream2
users keep it), else the shipped cfgs/accumulnator.json. Keys: begin_epoch, end_epoch, begin_grad_accum,
end_grad_accum (integers) and curve ("linear" or "log"); "documentation" is ignored.

The table is EveryDream2's: epochs before begin_epoch use begin_grad_accum; epochs begin_epoch ..
end_epoch - 1 take round() of torch.linspace(begin_grad_accum, end_grad_accum, end_epoch - begin_epoch)
(or torch.logspace in base 2 between the log2 of both); later epochs keep the last value set.
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

import torch

from utils.options.config import ConfigError
from utils.plugins import BasePlugin

log = logging.getLogger(__name__)

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "cfgs" / "accumulnator.json"
USER_CONFIG = Path("plugins") / "accumulnator.json"   # relative to the current directory
INT_KEYS = ("begin_epoch", "end_epoch", "begin_grad_accum", "end_grad_accum")
CURVES = ("linear", "log")


def config_path() -> Path:
    """The config file used: ./plugins/accumulnator.json if it exists, else the shipped one."""
    return USER_CONFIG.resolve() if USER_CONFIG.is_file() else SHIPPED_CONFIG


def read_config(path: Path) -> dict:
    """The file's settings, checked; every problem is a ConfigError naming the file and key."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the Accumulnator config ({e})") from e
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a JSON object with keys {', '.join(INT_KEYS)}, curve")
    known = (*INT_KEYS, "curve", "documentation")
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            log.warning("%s: unknown key %r ignored%s", path, key, f" (did you mean {close[0]!r}?)" if close else "")
    config = {}
    for key in INT_KEYS:
        if key not in raw:
            raise ConfigError(f"{path}: key {key!r} is missing; it must be an integer")
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: key {key!r} must be an integer; got {json.dumps(value)}")
        config[key] = value
    if config["begin_epoch"] < 0:
        raise ConfigError(f"{path}: key 'begin_epoch' must be 0 or more (epochs count from 0); "
                          f"got {config['begin_epoch']}")
    if config["end_epoch"] < config["begin_epoch"]:
        raise ConfigError(f"{path}: key 'end_epoch' ({config['end_epoch']}) must not be before 'begin_epoch' "
                          f"({config['begin_epoch']})")
    for key in ("begin_grad_accum", "end_grad_accum"):
        if config[key] < 1:
            raise ConfigError(f"{path}: key {key!r} must be at least 1; got {config[key]}")
    if "curve" not in raw:
        raise ConfigError(f"{path}: key 'curve' is missing; it must be one of {', '.join(CURVES)}")
    if raw["curve"] not in CURVES:
        raise ConfigError(f"{path}: key 'curve' must be one of {', '.join(CURVES)}; got {json.dumps(raw['curve'])}")
    config["curve"] = raw["curve"]
    return config


def grad_accum_table(begin_epoch: int, end_epoch: int, begin_grad_accum: int, end_grad_accum: int,
                     curve: str) -> dict[int, int]:
    """{epoch: grad_accum} computed as EveryDream2 does (float32 torch.linspace / torch.logspace, round())."""
    steps = end_epoch - begin_epoch
    if curve == "linear":
        accums = torch.linspace(begin_grad_accum, end_grad_accum, steps, dtype=torch.float32).tolist()
    elif curve == "log":
        accums = torch.logspace(math.log(begin_grad_accum, 2), math.log(end_grad_accum, 2), steps, base=2,
                                dtype=torch.float32).tolist()
    else:
        raise ValueError(f"curve {curve!r} is not one of {', '.join(CURVES)}")
    table = {epoch: begin_grad_accum for epoch in range(begin_epoch)}
    table.update({begin_epoch + i: round(accum) for i, accum in enumerate(accums)})
    return table


class Accumulnator(BasePlugin):
    """Sets grad_accum per epoch from the table: at each epoch's start (so epoch 0 and a resumed run get
    their epoch's value) and, as EveryDream2 does, at each epoch's end for the next epoch."""

    def __init__(self, config: Optional[str | os.PathLike] = None):
        path = Path(config) if config is not None else config_path()
        settings = read_config(path)
        self.config_path = path
        self.per_epoch_grad_accum = grad_accum_table(**settings)
        self.last_set: Optional[int] = None
        log.info("Accumulnator (%s): grad_accum per epoch %s%s", path, self.per_epoch_grad_accum,
                 ", then the last value" if self.per_epoch_grad_accum else "")

    def grad_accum_for(self, epoch: int) -> Optional[int]:
        """The table's value for `epoch`; past the table, its last value; None if the table is empty."""
        table = self.per_epoch_grad_accum
        if epoch in table:
            return table[epoch]
        if table and epoch > max(table):
            return table[max(table)]
        return None

    def _apply(self, epoch: int, callback) -> None:
        value = self.grad_accum_for(epoch)
        if value is None or value == self.last_set:
            return
        log.info("Accumulnator: grad_accum %d for epoch %d", value, epoch)
        callback("grad_accum", value)
        self.last_set = value

    def on_epoch_start(self, **kwargs) -> None:
        self._apply(kwargs["epoch"], kwargs["arg_update_callback"])

    def on_epoch_end(self, **kwargs) -> None:
        next_epoch = kwargs["epoch"] + 1
        if next_epoch in self.per_epoch_grad_accum:
            self._apply(next_epoch, kwargs["arg_update_callback"])
