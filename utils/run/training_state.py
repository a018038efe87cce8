"""Everything beyond the weights that a run needs to continue exactly where it stopped.

A resumable checkpoint is a diffusers folder holding, besides the pipeline and the optimizer state files,
`training_state.pt`: the position in the run (epoch, step within the epoch, global step), every random
generator, the LR schedules, the grad scaler, the gradients of an unfinished accumulation window, the running
loss sums and the validation history. Resuming from it on the same data with the same batch settings
replays the rest of the run exactly: on CPU the final weights equal the uninterrupted run's bit for bit.

The file holds only tensors, numbers, strings and lists, so it loads with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils.options.config import ConfigError

STATE_FILE = "training_state.pt"
FORMAT = 1
# The settings that fix the order and grouping of the data and the random stream: a checkpoint continues a run
# exactly only when they are unchanged.
RUN_DEFINING_KEYS = ("batch_size", "grad_accum", "seed", "resolution", "cache_latents")


@dataclass
class TrainingState:
    epoch: int  # the epoch the next step belongs to
    step_in_epoch: int  # the next step's index within that epoch
    global_step: int  # steps done
    fingerprint: dict
    rng: dict = field(default_factory=dict)
    schedules: dict = field(default_factory=dict)
    scaler: dict | None = None
    pending_grads: dict = field(default_factory=dict)  # model name -> {parameter name: grad} mid-window
    epoch_loss_sum: float = 0.0
    loss_since_log_sum: float = 0.0
    steps_since_log: int = 0
    epoch_losses: list = field(default_factory=list)
    validation: dict = field(default_factory=dict)  # the validator's history, for its trend warnings
    ema_updates: int = 0  # optimizer updates the EMA has counted (its update cadence)
    skipped_updates: int = 0  # non-finite updates skipped so far
    grad_accum: int | None = None  # as a plugin last set it (None: the configured grad_accum)


def fingerprint(args, records, num_processes: int, trained: list[str]) -> dict:
    """What must match for an exact continuation: the run-defining options, the models trained and the data as
    bucketed. (cache_latents: with it, each image keeps one crop.)"""
    digest = hashlib.sha256()
    for record in records:  # every field: path, caption, size, bucket, repeats, batch group, per-image options
        digest.update(repr(record).encode())
        if record.mask_path:  # not in the repr (see ImageRecord)
            digest.update(f"mask:{record.mask_path}".encode())
    return {**{key: getattr(args, key) for key in RUN_DEFINING_KEYS}, "num_processes": num_processes,
            "trained": sorted(trained), "images": len(records), "data": digest.hexdigest()}


def differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between a checkpoint's fingerprint and this run's."""
    changed = [key for key in current if saved.get(key) != current.get(key)]
    return ["the training data (images, captions or their settings) changed" if key == "data" else
            f"{key}: {saved.get(key)!r} then, {current.get(key)!r} now" for key in changed]


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "python": _python_state_to_list(random.getstate())}
    np_state = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def pending_gradients(models: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """The gradients accumulated so far in an unfinished grad_accum window, on the CPU."""
    return {name: {p_name: p.grad.detach().cpu().clone() for p_name, p in model.named_parameters()
                   if p.grad is not None}
            for name, model in models.items()}


def restore_gradients(models: dict[str, torch.nn.Module], grads: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, model in models.items():
        saved = grads.get(name, {})
        for p_name, p in model.named_parameters():
            if p_name in saved:
                p.grad = saved[p_name].to(device=p.device, dtype=p.dtype)


def save(state: TrainingState, folder: Path) -> None:
    torch.save({"format": FORMAT, **asdict(state)}, Path(folder) / STATE_FILE)


def load(folder: Path) -> TrainingState | None:
    """The state saved in a checkpoint folder, or None for a weights-only checkpoint."""
    file = Path(folder) / STATE_FILE
    if not file.is_file():
        return None
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not ours: say which file, never a library traceback
        raise ConfigError(f"{file}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}). To start a "
                          "new run from this checkpoint's weights, copy the folder without this file and resume "
                          "from the copy.") from None
    if data.pop("format", None) != FORMAT:
        raise ConfigError(f"{file}: written by another version of this trainer. To start a new run from this "
                          "checkpoint's weights, copy the folder without this file and resume from the copy.")
    return TrainingState(**data)
