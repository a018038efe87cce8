"""optimizer.json -> one optimizer and one LR schedule per trained model (UNet, text encoder).

File format (EveryDream2's, REFERENCE.md §6): `base` holds the UNet's settings and the defaults for the text
encoder; `text_encoder_overrides` replaces any of them for the text encoder; `doc` is free text. A value of
null (or a missing key) falls back to the next level: text encoder -> base -> train.json -> built-in default.
The main `lr` option, when set, wins over both models' file values (with a warning).
"""
from __future__ import annotations

import copy
import difflib
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LambdaLR

from utils.config import ConfigError, read_json_object
from utils.flags import LR_SCHEDULERS

log = logging.getLogger(__name__)

DEFAULT_SETTINGS = {
    "optimizer": "adamw8bit",
    "lr": 1e-6,
    "lr_scheduler": None,
    "lr_warmup_steps": None,
    "lr_decay_steps": None,
    "betas": [0.9, 0.999],
    "epsilon": 1e-8,
    "weight_decay": 0.01,
    # Used by optimizers of later versions (D-Adaptation, Prodigy); accepted now so shipped files load.
    "d0": 1e-6,
    "decouple": True,
    "momentum": 0.0,
    "growth_rate": float("inf"),
    "no_prox": False,
    "safeguard_warmup": True,
}
IMPLEMENTED = ("adamw", "adamw8bit")
PLANNED = ("lion", "lion8bit", "prodigy", "dadapt_adam", "dadapt_adan", "dadapt_lion", "dadapt_sgd", "adacoor",
           "coordinate_dowg", "scalar_dowg")
TOP_LEVEL_KEYS = ("doc", "base", "text_encoder_overrides", "text_encoder_freezing", "apply_grad_scaler_step_tweaks",
                  "log_grad_norm", "text_encoder_lr_scale")


@dataclass
class OptimizerSettings:
    """Everything one model's optimizer and schedule need, fully resolved."""
    optimizer: str
    lr: float
    lr_scheduler: str
    lr_warmup_steps: int
    lr_decay_steps: int
    betas: tuple[float, float]
    epsilon: float
    weight_decay: float
    extra: dict = field(default_factory=dict)


def read_optimizer_file(path: str | Path) -> dict:
    """Reads and checks optimizer.json; a missing default file means built-in defaults."""
    path = Path(path)
    if not path.is_file():
        log.info("No optimizer config at %s: using AdamW8bit, lr 1e-6, betas 0.9/0.999, weight decay 0.01.", path)
        return {}
    data = read_json_object(path, "", "optimizer settings ('base' and 'text_encoder_overrides')")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{path}: unknown key '{key}'.{_suggest(key, TOP_LEVEL_KEYS)}")
    for key in ("base", "text_encoder_overrides", "text_encoder_freezing"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ConfigError(f"{path}: '{key}' must be an object of settings, got {json.dumps(data[key])}.")
    for key in ("apply_grad_scaler_step_tweaks", "log_grad_norm"):
        if data.get(key) is not None and not isinstance(data[key], bool):
            raise ConfigError(f"{path}: '{key}' must be true or false, got {json.dumps(data[key])}.")
    for section in ("base", "text_encoder_overrides"):
        for key, value in (data.get(section) or {}).items():
            if key not in DEFAULT_SETTINGS:
                raise ConfigError(f"{path}: unknown key '{section}.{key}'.{_suggest(key, DEFAULT_SETTINGS)}")
            if value is not None:
                _check_setting(key, value, f"{path}: '{section}.{key}'")
    freezing = data.get("text_encoder_freezing") or {}
    if any(value not in (None, False) for value in freezing.values()):
        raise ConfigError(f"{path}: 'text_encoder_freezing' is not implemented yet in this version (tracked in "
                          "issue #5). Remove it or set its values to null.")
    return data


def _check_setting(key: str, value, where: str) -> None:
    """Each setting's type and range, checked when the file is read: the optimizers are built only after the
    model has loaded, too late for a clear early error."""
    if key == "optimizer":
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be an optimizer name, got {json.dumps(value)}.")
        _check_optimizer_name(value, where)
        return
    if key == "lr_scheduler":
        if value not in LR_SCHEDULERS:
            raise ConfigError(f"{where} is {json.dumps(value)}; choose one of: {', '.join(LR_SCHEDULERS)}.")
        return
    if key in ("decouple", "no_prox", "safeguard_warmup"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {json.dumps(value)}.")
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key == "betas":
        if not (isinstance(value, list) and len(value) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value)):
            raise ConfigError(f"{where} must be two numbers from 0 to below 1, e.g. [0.9, 0.999]; got "
                              f"{json.dumps(value)}.")
    elif key in ("lr_warmup_steps", "lr_decay_steps"):
        if not (number and (isinstance(value, int) or value.is_integer()) and value >= 0):
            raise ConfigError(f"{where} must be a whole number of steps (0 or more), got {json.dumps(value)}.")
    elif key == "growth_rate":  # Infinity (no limit on growth) is its default
        if not (number and value > 0):
            raise ConfigError(f"{where} must be a number above 0 (Infinity allowed), got {json.dumps(value)}.")
    elif not (number and 0 <= value <= sys.float_info.max):  # lr, epsilon, weight_decay, d0, momentum
        raise ConfigError(f"{where} must be a finite number, 0 or more; got {json.dumps(value)}.")


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(options)}."


def _check_optimizer_name(name: str, where: str) -> None:
    name = name.lower()
    if name in PLANNED:
        raise ConfigError(f"{where}: optimizer '{name}' is not implemented yet in this version (tracked in issue #5). "
                          f"Use one of: {', '.join(IMPLEMENTED)}.")
    if name not in IMPLEMENTED:
        raise ConfigError(f"{where}: unknown optimizer '{name}'. Use one of: {', '.join(IMPLEMENTED)}.")


def resolve_settings(file_data: dict, args: SimpleNamespace, steps_per_epoch: int) -> dict[str, OptimizerSettings]:
    """Resolves the UNet and text encoder settings (REFERENCE.md §6.3)."""
    decay = args.lr_decay_steps or int(steps_per_epoch * args.max_epochs * 1.5)
    main = {"lr_scheduler": args.lr_scheduler, "lr_decay_steps": decay,
            "lr_warmup_steps": args.lr_warmup_steps if args.lr_warmup_steps is not None else int(decay / 50)}
    base = _layer(DEFAULT_SETTINGS, main, file_data.get("base"))
    te = _layer(base, file_data.get("text_encoder_overrides"))
    if args.lr is not None:
        if any((file_data.get(s) or {}).get("lr") is not None for s in ("base", "text_encoder_overrides")):
            log.warning("lr %g from %s overrides the learning rates in optimizer.json.", args.lr,
                        args.sources.get("lr", "the config"))
        base["lr"] = te["lr"] = args.lr
    if args.scale_lr:
        factor = (args.batch_size * args.grad_accum) ** 0.55
        log.info("scale_lr: learning rates x %.3f = (batch_size %d x grad_accum %d) ^ 0.55: UNet %g, text encoder %g",
                 factor, args.batch_size, args.grad_accum, base["lr"] * factor, te["lr"] * factor)
        base["lr"], te["lr"] = base["lr"] * factor, te["lr"] * factor
    return {"unet": _settings(base), "text_encoder": _settings(te)}


def _layer(*layers: dict | None) -> dict:
    merged = {}
    for layer in layers:
        merged.update({k: v for k, v in (layer or {}).items() if v is not None})
    return merged


def _settings(values: dict) -> OptimizerSettings:
    values = copy.deepcopy(values)
    decay = values.pop("lr_decay_steps") or 1
    return OptimizerSettings(
        optimizer=values.pop("optimizer").lower(), lr=float(values.pop("lr")),
        lr_scheduler=values.pop("lr_scheduler"), lr_warmup_steps=int(values.pop("lr_warmup_steps")),
        lr_decay_steps=int(decay), betas=tuple(values.pop("betas")), epsilon=float(values.pop("epsilon")),
        weight_decay=float(values.pop("weight_decay")), extra=values)


def make_optimizer(params, settings: OptimizerSettings) -> torch.optim.Optimizer:
    kwargs = dict(lr=settings.lr, betas=settings.betas, eps=settings.epsilon, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    # fused AdamW is one kernel per step on CUDA; foreach is the fast path elsewhere.
    on_cuda = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, **kwargs, fused=on_cuda or None, foreach=None if on_cuda else True)


def make_lr_schedule(optimizer: torch.optim.Optimizer, settings: OptimizerSettings) -> LambdaLR:
    """diffusers' schedule, held at its end value past lr_decay_steps instead of rising again."""
    shape = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=settings.lr_warmup_steps,
                          num_training_steps=settings.lr_decay_steps).lr_lambdas[0]
    end = settings.lr_decay_steps
    return LambdaLR(optimizer, lambda step: shape(min(step, end)))


class TrainingOptimizers:
    """The optimizers and LR schedules of the trained models, stepped together with one grad scaler."""

    def __init__(self, models: dict[str, torch.nn.Module], settings: dict[str, OptimizerSettings]):
        self.models = models
        self.settings = settings
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedules: dict[str, LambdaLR] = {}
        for name, model in models.items():
            params = [p for p in model.parameters() if p.requires_grad]
            self.optimizers[name] = make_optimizer(params, settings[name])
            self.schedules[name] = make_lr_schedule(self.optimizers[name], settings[name])

    def current_lrs(self) -> dict[str, float]:
        return {name: schedule.get_last_lr()[0] for name, schedule in self.schedules.items()}

    def clip_and_step(self, scaler, clip_grad_norm: float | None, measure_norms: bool) -> dict[str, torch.Tensor]:
        """Unscales, optionally clips, steps every optimizer and updates the scaler once; returns grad norms."""
        norms = {}
        for name, optimizer in self.optimizers.items():
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip_grad_norm is not None or measure_norms:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                norms[name] = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm or math.inf)
        for optimizer in self.optimizers.values():
            if scaler is not None:
                scaler.step(optimizer)
            else:
                optimizer.step()
        if scaler is not None:
            scaler.update()
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        return norms

    def step_schedules(self) -> None:
        for schedule in self.schedules.values():
            schedule.step()

    def state_dicts(self) -> dict[str, dict]:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dicts(self, states: dict[str, dict]) -> None:
        for name, state in states.items():
            if name in self.optimizers:
                self.optimizers[name].load_state_dict(state)
