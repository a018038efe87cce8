"""optimizer.json -> one optimizer and one LR schedule per trained model (UNet, text encoder).

File format (EveryDream2's, REFERENCE.md §6): `base` holds the UNet's settings and the defaults for the text
encoder; `text_encoder_overrides` replaces any of them for the text encoder; `text_encoder_lr_scale` multiplies
the text encoder's rate unless the overrides set one; `text_encoder_freezing` is handled by optimizer.freezing;
`doc` is free text. A value of null (or a missing key) falls back to the next level: text encoder -> base ->
train.json -> built-in default. The main `lr` option, when set, wins over both models' file values (with a
warning). doc/OPTIMIZERS.md describes every optimizer and key for users.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import dadaptation
import lion_pytorch
import prodigyopt
import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LambdaLR

from optimizer.adacoor import AdaCoor
from optimizer.freezing import check_freezing_config
from optimizer.per_parameter import COMPENSATION, BucketedOptimizer, GatherBuffers
from utils.options.config import ConfigError, read_json_object
from utils.options.flags import LR_SCHEDULERS
from utils.options.values import boolean, check_section, did_you_mean, is_number, is_whole, unknown_key

log = logging.getLogger(__name__)

DEFAULT_SETTINGS = {
    "optimizer": "adamw8bit",
    "lr": 1e-6,
    "lr_scheduler": None,
    "lr_warmup_steps": None,
    "lr_decay_steps": None,
    "betas": None,  # per optimizer: _default_betas
    "epsilon": 1e-8,
    "weight_decay": 0.01,
    "d0": 1e-6,
    "decouple": True,
    "momentum": 0.0,
    "growth_rate": float("inf"),
    "no_prox": False,
    "safeguard_warmup": True,
}
ADAM_BETAS = (0.9, 0.999)
# Adan averages the gradient, its change and the squared update; these are the dadaptation package's defaults.
ADAN_BETAS = (0.98, 0.92, 0.99)
BITSANDBYTES = ("adamw8bit", "lion8bit")
D_ADAPTATION = {"dadapt_adam": dadaptation.DAdaptAdam, "dadapt_adan": dadaptation.DAdaptAdan,
                "dadapt_lion": dadaptation.DAdaptLion, "dadapt_sgd": dadaptation.DAdaptSGD}
# They adapt their own step size; lr multiplies it, and defaults to 1.0 when no file or option sets one.
LEARNING_RATE_FREE = ("prodigy", *D_ADAPTATION, "adacoor")
SUPPORTED = ("adamw", "adamw8bit", "lion", "lion8bit", *LEARNING_RATE_FREE)
NOT_SUPPORTED = ("coordinate_dowg", "scalar_dowg")
# From their authors' packages, as in EveryDream2. All need lr > 0: most of the packages refuse 0.
FROM_PACKAGES = ("lion", "prodigy", *D_ADAPTATION)
# They keep d, their running estimate of the distance to a solution, in each param group; d x lr is the step size.
D_ADAPTING_CLASSES = (prodigyopt.Prodigy, *D_ADAPTATION.values())
TOP_LEVEL_KEYS = ("doc", "base", "text_encoder_overrides", "text_encoder_freezing", "apply_grad_scaler_step_tweaks",
                  "log_grad_norm", "text_encoder_lr_scale")
# The 8-bit kernels quantize tensors from this size on; the probe must take that path.
PROBE_SIZE = 4096


# key -> (check, what a valid value is)
VALUE_CHECKS = {
    "optimizer": (lambda v: isinstance(v, str), "an optimizer name"),
    "lr": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "lr_scheduler": (lambda v: v in LR_SCHEDULERS, f"one of {', '.join(LR_SCHEDULERS)}"),
    "lr_warmup_steps": (lambda v: is_whole(v) and v >= 0, "a whole number of steps >= 0"),
    "lr_decay_steps": (lambda v: is_whole(v) and v >= 0, "a whole number of steps >= 0"),
    "betas": (lambda v: isinstance(v, list) and len(v) in (2, 3) and all(is_number(b) and 0 <= b < 1 for b in v),
              "two numbers in [0, 1), e.g. [0.9, 0.999] (three for dadapt_adan, e.g. [0.98, 0.92, 0.99])"),
    "epsilon": (lambda v: is_number(v) and v > 0, "a number > 0, e.g. 1e-8"),
    "weight_decay": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "d0": (lambda v: is_number(v) and v > 0, "a number > 0, e.g. 1e-6"),
    "decouple": (lambda v: isinstance(v, bool), "true or false"),
    "momentum": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "growth_rate": (lambda v: (is_number(v) or v == math.inf) and v >= 1,
                    "a number >= 1 (e.g. 1.02), or null or Infinity for unlimited"),
    "no_prox": (lambda v: isinstance(v, bool), "true or false"),
    "safeguard_warmup": (lambda v: isinstance(v, bool), "true or false"),
}


@dataclass
class OptimizerSettings:
    """Everything one model's optimizer and schedule need, fully resolved."""
    optimizer: str
    lr: float
    lr_scheduler: str
    lr_warmup_steps: int
    lr_decay_steps: int
    betas: tuple[float, ...]
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
            raise unknown_key(path, key, TOP_LEVEL_KEYS)
    for key in ("base", "text_encoder_overrides", "text_encoder_freezing"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ConfigError(f"{path}: '{key}' must be an object of settings, got {json.dumps(data[key])}.")
    for key in ("apply_grad_scaler_step_tweaks", "log_grad_norm"):
        if data.get(key) is not None:
            boolean(path, key, data[key])
    for section in ("base", "text_encoder_overrides"):
        values = data.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: '{section}' must be an object of optimizer settings, got {values!r}.")
        check_section(path, section, values, VALUE_CHECKS)
        if values.get("optimizer") is not None:
            _check_optimizer_name(values["optimizer"], f"{path}: {section}.optimizer")
    scale = data.get("text_encoder_lr_scale")
    if scale is not None and not (is_number(scale) and scale > 0):
        raise ConfigError(f"{path}: text_encoder_lr_scale must be a number > 0 (it multiplies the text encoder's "
                          f"learning rate), got {scale!r}. To not train the text encoder, use "
                          "disable_textenc_training.")
    _check_betas_fit(data, path)
    check_freezing_config(data.get("text_encoder_freezing"), str(path))
    return data


def _check_optimizer_name(name: str, where: str) -> None:
    name = name.lower()
    if name in NOT_SUPPORTED:
        raise ConfigError(f"{where}: optimizer '{name}' is not supported by this trainer (EveryDream2 needed the "
                          f"extra dowg package for it). Use one of: {', '.join(SUPPORTED)}.")
    if name not in SUPPORTED:
        raise ConfigError(f"{where}: unknown optimizer '{name}'.{did_you_mean(name, SUPPORTED)} Supported: "
                          f"{', '.join(SUPPORTED)}.")


def _check_betas_fit(data: dict, path: Path) -> None:
    """Each model's betas, as the text encoder inherits them from base, must be as many as its optimizer takes;
    the packages would fail only at the first step."""
    base, overrides = data.get("base") or {}, data.get("text_encoder_overrides") or {}
    for section, values in (("base", base), ("text_encoder_overrides", _layer(base, overrides))):
        name = (values.get("optimizer") or DEFAULT_SETTINGS["optimizer"]).lower()
        betas, wanted = values.get("betas"), _default_betas(name)
        if betas is not None and len(betas) != len(wanted):
            inherited = " (from base)" if section != "base" and overrides.get("betas") is None else ""
            raise ConfigError(f"{path}: {section}: optimizer '{name}' takes {len(wanted)} betas, e.g. "
                              f"{list(wanted)}; got {betas}{inherited}. Set {section}.betas.")


def _default_betas(optimizer_name: str) -> tuple[float, ...]:
    return ADAN_BETAS if optimizer_name == "dadapt_adan" else ADAM_BETAS


def check_optimizers_run_here(file_data: dict, where: str, device: torch.device | str) -> None:
    """Takes one step with each chosen bitsandbytes optimizer on the training device, before any model loads,
    so a machine where bitsandbytes cannot run stops with a clear message instead of failing at the first step.
    There is no silent fallback: the user picks another optimizer."""
    for key, name in _chosen_optimizers(file_data):
        if name not in BITSANDBYTES:
            continue
        problem = _probe(name, device)
        if problem:
            raise ConfigError(f"{where}: {key} '{name}' needs bitsandbytes, which cannot run on {device} here "
                              f"({problem}). Set {key.split(' ')[0]} to 'adamw' or 'lion' (both run everywhere) or "
                              "to a learning-rate-free optimizer such as 'dadapt_lion' (see doc/OPTIMIZERS.md).")


def optimizer_names(file_data: dict) -> dict[str, str]:
    """The UNet's and the text encoder's optimizer as optimizer.json chooses them (the text encoder's defaults to the
    UNet's, the UNet's to DEFAULT_SETTINGS')."""
    base = ((file_data.get("base") or {}).get("optimizer") or DEFAULT_SETTINGS["optimizer"]).lower()
    te = ((file_data.get("text_encoder_overrides") or {}).get("optimizer") or base).lower()
    return {"unet": base, "text_encoder": te}


def _chosen_optimizers(file_data: dict) -> list[tuple[str, str]]:
    """(where it was chosen, name) of the UNet's and the text encoder's optimizer, each name once."""
    names = optimizer_names(file_data)
    base_set = (file_data.get("base") or {}).get("optimizer")
    chosen = [("base.optimizer" if base_set else "base.optimizer (unset: the default)", names["unet"])]
    if names["text_encoder"] != names["unet"]:
        chosen.append(("text_encoder_overrides.optimizer", names["text_encoder"]))
    return chosen


def _probe(name: str, device: torch.device | str) -> str | None:
    """One step on a small weight; returns what went wrong, or None when the step moved it as it should."""
    settings = OptimizerSettings(optimizer=name, lr=1e-3, lr_scheduler="constant", lr_warmup_steps=0,
                                 lr_decay_steps=1, betas=(0.9, 0.999), epsilon=1e-8, weight_decay=0.0)
    try:
        weight = torch.nn.Parameter(torch.ones(PROBE_SIZE, device=device))
        weight.grad = torch.full_like(weight, 0.5)
        make_optimizer([weight], settings).step()
        moved = (weight.detach() - 1).cpu()
    except Exception as e:  # whatever the library raises on this device, it means it cannot train here
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"
    if not (torch.isfinite(moved).all() and (moved < 0).all()):
        return "its test step did not move the weights against the gradient"
    return None


def resolve_settings(file_data: dict, args: SimpleNamespace, steps_per_epoch: int,
                     processes: int = 1) -> dict[str, OptimizerSettings]:
    """Resolves the UNet and text encoder settings (REFERENCE.md §6.3). `processes`: the training processes, each
    with batch_size images per step; scale_lr scales by the images of one update over all of them."""
    decay = args.lr_decay_steps or int(steps_per_epoch * args.max_epochs * 1.5)
    main = {"lr_scheduler": args.lr_scheduler, "lr_decay_steps": decay,
            "lr_warmup_steps": args.lr_warmup_steps if args.lr_warmup_steps is not None else int(decay / 50)}
    base = _layer(DEFAULT_SETTINGS, main, file_data.get("base"))
    te = _layer(base, file_data.get("text_encoder_overrides"))
    base["lr"], te["lr"] = _learning_rates(file_data, args, base["optimizer"].lower(), te["optimizer"].lower())
    if args.scale_lr:
        factor = (args.batch_size * args.grad_accum * processes) ** 0.55
        log.info("scale_lr: learning rates x %.3f = (batch_size %d x grad_accum %d x %d process(es)) ^ 0.55: UNet "
                 "%g, text encoder %g", factor, args.batch_size, args.grad_accum, processes, base["lr"] * factor,
                 te["lr"] * factor)
        base["lr"], te["lr"] = base["lr"] * factor, te["lr"] * factor
    for model, values in (("UNet", base), ("text encoder", te)):
        name = values["optimizer"].lower()
        if name in FROM_PACKAGES and values["lr"] == 0:
            flag = "disable_unet_training" if model == "UNet" else "disable_textenc_training"
            raise ConfigError(f"lr 0 for the {model}'s {name}: lion, prodigy and the dadapt_* optimizers need an lr "
                              f"above 0. To leave the {model} untrained, set {flag}.")
        if name in LEARNING_RATE_FREE and values["lr"] < 0.1:
            log.warning("%s: %s adapts its own step size and lr %g multiplies it; 1.0 is the usual value (an "
                        "Adam-style rate like this one makes it barely train).", model, name, values["lr"])
    return {"unet": _settings(base), "text_encoder": _settings(te)}


def _learning_rates(file_data: dict, args: SimpleNamespace, unet_optimizer: str, te_optimizer: str):
    """(UNet, text encoder) rates: main lr > file lr > default; text_encoder_lr_scale multiplies the text
    encoder's rate unless text_encoder_overrides.lr sets it outright."""
    base_lr = (file_data.get("base") or {}).get("lr")
    te_lr = (file_data.get("text_encoder_overrides") or {}).get("lr")
    scale = file_data.get("text_encoder_lr_scale")
    if args.lr is not None:
        if base_lr is not None or te_lr is not None:
            log.warning("lr %g from %s overrides the learning rates in optimizer.json.", args.lr,
                        args.sources.get("lr", "the config"))
        return args.lr, args.lr * (scale or 1.0)
    unet = base_lr if base_lr is not None else _default_lr(unet_optimizer)
    if te_lr is not None:
        if scale not in (None, 1):
            log.warning("text_encoder_lr_scale %g is ignored: text_encoder_overrides.lr sets the text encoder's "
                        "rate (%g).", scale, te_lr)
        return unet, te_lr
    return unet, (base_lr if base_lr is not None else _default_lr(te_optimizer)) * (scale or 1.0)


def _default_lr(optimizer_name: str) -> float:
    return 1.0 if optimizer_name in LEARNING_RATE_FREE else DEFAULT_SETTINGS["lr"]


def _layer(*layers: dict | None) -> dict:
    merged = {}
    for layer in layers:
        merged.update({k: v for k, v in (layer or {}).items() if v is not None})
    return merged


def _settings(values: dict) -> OptimizerSettings:
    values = copy.deepcopy(values)
    decay = values.pop("lr_decay_steps") or 1
    name = values.pop("optimizer").lower()
    return OptimizerSettings(
        optimizer=name, lr=float(values.pop("lr")),
        lr_scheduler=values.pop("lr_scheduler"), lr_warmup_steps=int(values.pop("lr_warmup_steps")),
        lr_decay_steps=int(decay), betas=tuple(values.pop("betas", None) or _default_betas(name)),
        epsilon=float(values.pop("epsilon")), weight_decay=float(values.pop("weight_decay")), extra=values)


def make_optimizer(params, settings: OptimizerSettings) -> torch.optim.Optimizer:
    s, extra = settings, settings.extra
    if s.optimizer == "adamw":
        # fused AdamW is one kernel per step on CUDA; foreach is the fast path elsewhere.
        on_cuda = all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=s.lr, betas=s.betas, eps=s.epsilon, weight_decay=s.weight_decay,
                                 fused=on_cuda or None, foreach=None if on_cuda else True)
    if s.optimizer in BITSANDBYTES:
        return _bitsandbytes_optimizer(params, s)
    if s.optimizer == "lion":
        return lion_pytorch.Lion(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    if s.optimizer == "prodigy":
        # EveryDream2 leaves betas, eps and decouple at the package's defaults; the file's values are passed here.
        return prodigyopt.Prodigy(params, lr=s.lr, betas=s.betas, eps=s.epsilon, weight_decay=s.weight_decay,
                                  decouple=extra["decouple"], use_bias_correction=True,
                                  safeguard_warmup=extra["safeguard_warmup"], d0=extra["d0"],
                                  growth_rate=extra["growth_rate"])
    if s.optimizer in D_ADAPTATION:
        return D_ADAPTATION[s.optimizer](params, lr=s.lr, weight_decay=s.weight_decay, d0=extra["d0"],
                                         **_d_adaptation_options(s))
    if s.optimizer == "adacoor":
        return AdaCoor(params, lr=s.lr, eps=s.epsilon)
    raise ValueError(f"unknown optimizer {s.optimizer!r}")  # read_optimizer_file lets only SUPPORTED names through


def _bitsandbytes_optimizer(params, s: OptimizerSettings) -> torch.optim.Optimizer:
    import bitsandbytes  # not installed on macOS: imported only when chosen

    if s.optimizer == "adamw8bit":
        return bitsandbytes.optim.AdamW8bit(params, lr=s.lr, betas=s.betas, eps=s.epsilon, weight_decay=s.weight_decay)
    return bitsandbytes.optim.Lion8bit(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay,
                                       min_8bit_size=PROBE_SIZE)


def _d_adaptation_options(s: OptimizerSettings) -> dict:
    """What each D-Adaptation variant takes besides lr, weight_decay and d0, as EveryDream2 passes it. Its
    log_every stays 0: the package would print d to the console, and TensorBoard shows d x lr already."""
    extra = s.extra
    return {"dadapt_adam": dict(betas=s.betas, eps=s.epsilon, decouple=extra["decouple"],
                                growth_rate=extra["growth_rate"]),
            "dadapt_adan": dict(betas=s.betas, eps=s.epsilon, no_prox=extra["no_prox"],
                                growth_rate=extra["growth_rate"]),
            "dadapt_lion": dict(betas=s.betas),
            "dadapt_sgd": dict(momentum=extra["momentum"], growth_rate=extra["growth_rate"])}[s.optimizer]


def make_lr_schedule(optimizer: torch.optim.Optimizer, settings: OptimizerSettings) -> LambdaLR:
    """diffusers' schedule, held at its end value past lr_decay_steps instead of rising again."""
    shape = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=settings.lr_warmup_steps,
                          num_training_steps=settings.lr_decay_steps).lr_lambdas[0]
    end = settings.lr_decay_steps
    return LambdaLR(optimizer, lambda step: shape(min(step, end)))


# Optimizers whose update of a weight depends on that weight alone: they can step one parameter at a time
# (fused_backward, bf16_weights). Prodigy, D-Adaptation and AdaCoor adapt one step size from all parameters together.
ELEMENT_WISE = ("adamw", "adamw8bit", "lion", "lion8bit")
# The same update with 8-bit states: what the 8-bit-states means of a memory plan switches to (doc/MEMORY.md).
EIGHT_BIT = {"adamw": "adamw8bit", "lion": "lion8bit"}


ROUNDING_KEY = "stochastic_rounding"  # the rounding stream's state, saved with the optimizers' states


class NonFiniteFusedUpdate(Exception):
    """With fused_backward a gradient was not finite, and its parameter was already updated in the backward pass."""

    def __init__(self):
        super().__init__("the gradients were not finite (inf or NaN), and with fused_backward each parameter is "
                         "updated inside the backward pass as its gradient arrives, so this update could not be "
                         "skipped. The weights are damaged; nothing was saved from them. Resume from the last "
                         "checkpoint with a lower learning rate, or turn fused_backward off (then non-finite updates "
                         "are skipped, see max_skipped_updates).")


def check_steps_per_parameter(optimizer_name: str, model: str = "UNet", where: str = "") -> None:
    """ConfigError unless the optimizer can be stepped one parameter at a time; `where`: the optimizer file."""
    if optimizer_name not in ELEMENT_WISE:
        raise ConfigError(f"{where + ': ' if where else ''}fused_backward and bf16_weights update one weight tensor "
                          f"at a time, and the {model}'s "
                          f"optimizer '{optimizer_name}' computes its step size from all of them together. Use one "
                          f"of {', '.join(ELEMENT_WISE)}, or turn fused_backward and bf16_weights off.")


class TrainingOptimizers:
    """The optimizers and LR schedules of the trained models, stepped together with one grad scaler.

    `fused_backward`: each parameter is updated inside the backward pass of an update step as soon as its gradient is
    complete (optimizer.per_parameter), and `clip_and_step` only reports. bf16 parameters (the bf16_weights means)
    are always stepped a bucket at a time, rounded stochastically with `rounding`, or without it compensated (each
    weight's rounding error kept in the optimizer state)."""

    def __init__(self, models: dict[str, torch.nn.Module], settings: dict[str, OptimizerSettings],
                 fused_backward: bool = False, rounding: torch.Generator | None = None):
        self.models = models
        self.settings = settings
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedules: dict[str, LambdaLR] = {}
        self.fused_backward = fused_backward
        self.rounding = rounding
        self._updating = False  # inside the backward pass of an update step (backward_pass)
        trained = {name: [p for p in model.parameters() if p.requires_grad] for name, model in models.items()}
        gather_buffers = GatherBuffers.for_params([p for params in trained.values() for p in params])
        for name, params in trained.items():
            bitsandbytes = settings[name].optimizer in BITSANDBYTES
            # bitsandbytes' own step waits for the GPU after each tensor, and makes channels-last weights contiguous
            # for good (slower convolutions): buckets of copies avoid both.
            if fused_backward or bitsandbytes or any(p.dtype == torch.bfloat16 for p in params):
                check_steps_per_parameter(settings[name].optimizer, name)
                optimizer = BucketedOptimizer(params, lambda ps, s=settings[name]: make_optimizer(ps, s),
                                              settings[name].lr, gather_buffers, rounding,
                                              bitsandbytes=bitsandbytes, measure_norm=fused_backward)
            else:
                optimizer = make_optimizer(params, settings[name])
            self.optimizers[name] = optimizer
            self.schedules[name] = make_lr_schedule(optimizer, settings[name])
            if fused_backward:
                # Weak references: a hook that held the optimizer would keep the whole model alive through its
                # parameters' hooks (a cycle through C++ that Python's collector cannot see).
                step = weakref.WeakMethod(self._step_in_backward)
                for p in params:
                    p.register_post_accumulate_grad_hook(lambda p, name=name, step=step: step() and step()(name, p))

    @contextlib.contextmanager
    def backward_pass(self, update: bool):
        """Around each step's backward pass: with fused_backward, an update step's weights are updated inside it
        (and a grad_accum window's earlier steps only accumulate)."""
        self._updating = update
        try:
            yield
        finally:
            self._updating = False

    def _step_in_backward(self, name: str, p: torch.Tensor) -> None:
        if self._updating:
            self.optimizers[name].ready(p)

    def current_lrs(self) -> dict[str, float]:
        """The rate each model steps with: the scheduled lr, times d for the D-adapting optimizers."""
        lrs = {}
        for name, schedule in self.schedules.items():
            optimizer = self.optimizers[name]
            scale = optimizer.param_groups[0]["d"] if isinstance(optimizer, D_ADAPTING_CLASSES) else 1.0
            lrs[name] = schedule.get_last_lr()[0] * scale
        return lrs

    def clip_and_step(self, scaler, clip_grad_norm: float | None) -> tuple[dict[str, torch.Tensor], bool]:
        """Unscales, optionally clips, and steps every optimizer, then updates the scaler once.

        Returns the gradient norms and whether the update was made: gradients that are not finite (an fp16
        overflow, a diverging run) are dropped and no optimizer steps, as GradScaler does for fp16. Telling costs
        one host sync per update (GradScaler pays the same). With fused_backward the update was made during the
        backward pass; a non-finite gradient there stops the run (NonFiniteFusedUpdate)."""
        if self.fused_backward:
            norms = {}
            for name, optimizer in self.optimizers.items():
                optimizer.step()  # the last, partly filled bucket of the backward pass (and LR schedules see a step)
                norms[name] = optimizer.squared_norm.sqrt()
                optimizer.squared_norm = torch.zeros_like(optimizer.squared_norm)
            if not bool(torch.isfinite(torch.stack(list(norms.values()))).all()):
                raise NonFiniteFusedUpdate()
            return norms, True
        norms = {}
        for name, optimizer in self.optimizers.items():
            if scaler is not None:
                scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norms[name] = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm) if clip_grad_norm is not None \
                else torch.nn.utils.get_total_norm([p.grad for p in params])
        finite = bool(torch.isfinite(torch.stack([n.float() for n in norms.values()])).all())
        if finite:
            for optimizer in self.optimizers.values():
                if scaler is not None:
                    scaler.step(optimizer)
                else:
                    optimizer.step()
        if scaler is not None:
            scaler.update()  # after an overflow: a smaller scale
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        return norms, finite

    def step_schedules(self) -> None:
        for schedule in self.schedules.values():
            schedule.step()

    def state_dicts(self) -> dict[str, dict]:
        states = {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}
        if self.rounding is not None:
            states[ROUNDING_KEY] = {"generator": self.rounding.get_state()}
        return states

    def load_state_dicts(self, states: dict[str, dict]) -> None:
        """Raises ValueError for a state that does not fit its optimizer."""
        if self.rounding is not None and ROUNDING_KEY in states:
            self.rounding.set_state(states[ROUNDING_KEY]["generator"])
        for name, state in states.items():
            if name in self.optimizers:
                optimizer = self.optimizers[name]
                _check_state_fits(optimizer, state)
                if not _rounds_compensated(optimizer):  # a run with compensated rounding saved its rounding errors
                    state = {**state, "state": {index: {k: v for k, v in values.items() if k != COMPENSATION}
                                                for index, values in state["state"].items()}}
                optimizer.load_state_dict(state)


def _rounds_compensated(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, BucketedOptimizer) and optimizer.rounding is None and \
        optimizer.params[0].dtype == torch.bfloat16


def _check_state_fits(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A package optimizer reads its settings from its param groups, which loading replaces by the saved ones: a state
    saved by another optimizer (or by this trainer's own Prodigy and D-Adaptation before they came from the packages)
    would fail at the first step for want of a setting."""
    if not isinstance(optimizer, (lion_pytorch.Lion, *D_ADAPTING_CLASSES)):
        return  # PyTorch's optimizers fill in settings an older state lacks; AdaCoor and bitsandbytes' are unchanged
    for group in state["param_groups"]:
        missing = set(optimizer.defaults) - set(group)
        if missing:
            raise ValueError(f"it was saved by another optimizer: no {', '.join(sorted(missing))}")
