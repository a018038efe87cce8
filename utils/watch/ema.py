"""EMA: an exponential moving average of the trained models' weights, kept beside training (doc/EMA.md).

Only the parameters of the models being trained (UNet and/or text encoder) are averaged; frozen models and
buffers are shared with the live model. The average is updated after every `ema_update_interval`-th optimizer
update as ema <- decay * ema + (1 - decay) * live. For sampling and saving, the averaged tensors trade places
with the live parameters and are traded back afterwards, so the live weights come back bit for bit and no
second model is ever built.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import torch

from utils.run.checkpoint import EMA_SUFFIX, find_last_for
from utils.options.config import ConfigError, missing_model

log = logging.getLogger(__name__)

# Cross-device updates copy the live weights over in chunks of this many elements (1 GiB of fp32), which
# bounds the extra host memory an update needs.
COPY_CHUNK_ELEMENTS = 2**28


def enabled(args: SimpleNamespace) -> bool:
    return args.ema_decay_rate is not None or args.ema_strength_target is not None


def check_options(args: SimpleNamespace) -> Path | None:
    """Checks the EMA options before any model loads; returns the checkpoint the EMA starts from, if any."""
    if not enabled(args):
        if args.ema_resume_model is not None:
            raise ConfigError(f"{args.sources.get('ema_resume_model', 'defaults')}: ema_resume_model is set but EMA "
                              "is off. Set ema_decay_rate (e.g. 0.999) or ema_strength_target to train an EMA "
                              "model, or remove ema_resume_model.")
        for flag in ("ema_sample_nonema_model", "ema_sample_ema_model"):
            if getattr(args, flag):
                log.warning("%s has no effect: EMA is off (set ema_decay_rate or ema_strength_target).", flag)
        return None
    if args.ema_device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{args.sources.get('ema_device', 'defaults')}: ema_device is 'cuda' but PyTorch sees no "
                          "CUDA GPU on this machine. Use ema_device 'cpu'.")
    if args.ema_resume_model is None:
        return None
    if args.ema_resume_model == "findlast":
        return find_last_for(args, ema=True)
    where = args.sources.get("ema_resume_model", "defaults")
    path = Path(args.ema_resume_model)
    if not path.exists():
        raise ConfigError(missing_model(where, "ema_resume_model", args.ema_resume_model,
                                        f"Give an `{EMA_SUFFIX}` diffusers folder or `{EMA_SUFFIX}.safetensors` file "
                                        "saved by an earlier run, or `findlast`."))
    if path.is_file() and path.suffix.lower() not in (".safetensors", ".ckpt"):
        raise ConfigError(f"{where}: ema_resume_model '{path}' is a file but not a .safetensors or .ckpt checkpoint. "
                          "Give one of those, or a diffusers model folder.")
    return path


def load_start(path: Path, trained: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """The parameters of `trained`'s models as stored in the checkpoint at `path`, checked to fit them exactly."""
    from utils.model import models

    loaded = models.load(path)
    start = {}
    for name, module in trained.items():
        theirs = dict(getattr(loaded, name).named_parameters())
        ours = dict(module.named_parameters())
        missing = sorted(ours.keys() - theirs.keys())
        extra = sorted(theirs.keys() - ours.keys())
        reshaped = [key for key in ours.keys() & theirs.keys() if ours[key].shape != theirs[key].shape]
        if missing or extra or reshaped:
            detail = (f"missing '{missing[0]}'" if missing else f"unexpected '{extra[0]}'" if extra else
                      f"'{reshaped[0]}' is {tuple(theirs[reshaped[0]].shape)}, not {tuple(ours[reshaped[0]].shape)}")
            raise models.ModelLoadError(
                f"ema_resume_model {path}: its {name} does not fit the model being trained ({detail}). Give the "
                f"`{EMA_SUFFIX}` checkpoint saved while training this model, or unset ema_resume_model to start the "
                "EMA from the model being trained.")
        start[name] = {key: value.detach() for key, value in theirs.items()}
    return start


def resolve_decay(args: SimpleNamespace, steps_per_epoch: int) -> float:
    """The decay to use, from ema_decay_rate or, when set, ema_strength_target spread over the run; logged."""
    interval_steps = args.ema_update_interval * args.grad_accum
    total_steps = steps_per_epoch * args.max_epochs
    if args.ema_strength_target is None:
        decay = args.ema_decay_rate
        log.info("EMA: decay %.10g.", decay)
    else:
        if args.ema_decay_rate is not None:
            log.warning("ema_strength_target %g overrides ema_decay_rate %g.", args.ema_strength_target,
                        args.ema_decay_rate)
        # The strength is what is left of the starting weights after the whole run: decay ** updates.
        decay = args.ema_strength_target ** (interval_steps / total_steps)
        log.info("EMA: decay %.10g, from ema_strength_target %g = decay ** (%d steps / %d steps per update).", decay,
                 args.ema_strength_target, total_steps, interval_steps)
    optimizer_updates = args.max_epochs * math.ceil(steps_per_epoch / args.grad_accum)
    log.info("EMA: updated after every %d optimizer updates (%d training steps with grad_accum %d), kept on %s.",
             args.ema_update_interval, interval_steps, args.grad_accum, args.ema_device)
    if optimizer_updates < args.ema_update_interval:
        log.warning("EMA: this run has %d optimizer updates, fewer than ema_update_interval %d, so the EMA model is "
                    "never updated and stays the starting model. Lower ema_update_interval.", optimizer_updates,
                    args.ema_update_interval)
    return decay


def sampled_models(args: SimpleNamespace) -> list[str]:
    """Which models the samples show: "" = the training model, "ema" = the EMA model.

    With EMA on, the EMA model by default; ema_sample_nonema_model alone switches to the training model,
    and with both flags both are sampled.
    """
    if not enabled(args):
        return [""]
    return ([""] if args.ema_sample_nonema_model else []) + \
        (["ema"] if args.ema_sample_ema_model or not args.ema_sample_nonema_model else [])


class EMA:
    """The moving average of the trained models' parameters, on `device`, in the parameters' own dtype (fp32 for
    bf16 ones)."""

    def __init__(self, trained: dict[str, torch.nn.Module], decay: float, every: int, device: torch.device,
                 start: dict[str, dict[str, torch.Tensor]] | None = None):
        self.decay = decay
        self.every = every
        self.optimizer_updates = 0
        self.live: list[torch.nn.Parameter] = []
        self.averaged: list[torch.Tensor] = []
        with torch.no_grad():
            for name, module in trained.items():
                for key, param in module.named_parameters():
                    source = start[name][key] if start else param.detach()
                    self.live.append(param)
                    # bf16_weights: the average stays fp32, where updates of (1 - decay) x difference still count
                    dtype = torch.float32 if param.dtype == torch.bfloat16 else param.dtype
                    self.averaged.append(source.to(device, dtype, non_blocking=True, copy=True))
        # The tensors' own devices, which carry the index ("cuda:0") a device argument may leave out.
        self.device = self.averaged[0].device
        self.live_device = self.live[0].device
        self.crosses_devices = self.live_device != self.device
        self._wait_for_copies()
        if self.crosses_devices and self.device.type == "cpu":
            # Pinned host memory lets the copies to and from the GPU run asynchronously.
            self.averaged = [t if t.is_pinned() else t.pin_memory() for t in self.averaged]

    @torch.no_grad()
    def step(self) -> bool:
        """Call after every optimizer update; every `every`-th call folds the live weights into the average."""
        self.optimizer_updates += 1
        if self.optimizer_updates % self.every:
            return False
        for live, averaged in self._chunks():
            live_here = [p.detach().to(self.device, a.dtype, non_blocking=True) for p, a in zip(live, averaged)]
            self._wait_for_copies()
            # lerp(ema, live, 1 - decay) = decay * ema + (1 - decay) * live, in one pass over memory.
            torch._foreach_lerp_(averaged, live_here, 1.0 - self.decay)
        return True

    @contextlib.contextmanager
    def swapped_in(self):
        """Within the block the trained modules hold the averaged weights (to sample or save them).

        The live and averaged tensors trade places and trade back afterwards, so the live weights return bit for
        bit. On one device nothing is copied; with the EMA on the CPU and training on the GPU each parameter
        crosses over on its own, so GPU memory does not grow.
        """
        self._exchange()
        try:
            yield
        finally:
            self._exchange()

    @torch.no_grad()
    def _exchange(self) -> None:
        for live, averaged in zip(self.live, self.averaged):
            live.data, averaged.data = (averaged.data.to(self.live_device, non_blocking=True),
                                        live.data.to(self.device, non_blocking=True))
        self._wait_for_copies()

    def _chunks(self):
        """(live, averaged) parameter lists of at most COPY_CHUNK_ELEMENTS elements (or a single parameter)."""
        start, size = 0, 0
        for index, param in enumerate(self.live):
            if size and size + param.numel() > COPY_CHUNK_ELEMENTS:
                yield self.live[start:index], self.averaged[start:index]
                start, size = index, 0
            size += param.numel()
        yield self.live[start:], self.averaged[start:]

    def _wait_for_copies(self) -> None:
        """Non-blocking copies between the GPU and pinned host memory must land before the host reads them."""
        if self.crosses_devices:
            for device in (self.live_device, self.device):
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()


class EMAUpdates:
    """The loop's part for the EMA: folds the weights in after applied optimizer updates (every `every`-th)."""

    def __init__(self, ema: EMA):
        self.ema = ema

    def step_end(self, trainer, batch, out) -> None:
        if out.window_end and out.updated:
            self.ema.step()

    def state_dict(self) -> dict:
        return {"ema_updates": self.ema.optimizer_updates}

    def load_state_dict(self, state) -> None:
        self.ema.optimizer_updates = state.ema_updates
