"""optimizer.json's `text_encoder_freezing`: train only the last layers of the CLIP text encoder.

Keys (all optional, null = unset):
  unfreeze_last_n_layers   train only the last N encoder layers (N >= 1); unset = all layers
  freeze_front_n_layers    deprecated: N >= 0 freezes the first N layers, -k trains the last k;
                           unfreeze_last_n_layers wins when both are set
  freeze_embeddings        token and position embeddings; unset = frozen when some layers are frozen
  freeze_final_layer_norm  unset = trained
Frozen parameters get requires_grad False, so they get no gradients and are not given to the optimizer.
"""
from __future__ import annotations

import logging

import torch

from utils.options.config import ConfigError
from utils.options.values import check_section

log = logging.getLogger(__name__)

_LAYER_COUNT = (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number or null")
_SWITCH = (lambda v: isinstance(v, bool), "true, false or null")
# key -> (check, what a valid value is)
KEYS = {"unfreeze_last_n_layers": _LAYER_COUNT, "freeze_front_n_layers": _LAYER_COUNT, "freeze_embeddings": _SWITCH,
        "freeze_final_layer_norm": _SWITCH}


def check_freezing_config(freezing, where: str) -> None:
    """Validates the section's shape and values; `where` names the file for messages."""
    if freezing is None:
        return
    if not isinstance(freezing, dict):
        raise ConfigError(f"{where}: 'text_encoder_freezing' must be an object with keys {', '.join(KEYS)}.")
    check_section(where, "text_encoder_freezing", freezing, KEYS)
    last = freezing.get("unfreeze_last_n_layers")
    if last is not None and last < 1:
        raise ConfigError(f"{where}: text_encoder_freezing.unfreeze_last_n_layers must be at least 1, got {last}. "
                          "To train no text encoder layer at all, use disable_textenc_training.")
    if freezing.get("freeze_front_n_layers") is not None:
        log.warning("%s: text_encoder_freezing.freeze_front_n_layers is deprecated; use unfreeze_last_n_layers.",
                    where)


def freeze_text_encoder(trained: dict[str, torch.nn.Module], freezing: dict | None, where: str) -> str | None:
    """Freezes the text encoder's parts that the config leaves untrained; returns a one-line summary of what
    trains (None when the text encoder is not trained). A layer count beyond the model's is a ConfigError."""
    text_encoder = trained.get("text_encoder")
    if text_encoder is None:
        return None
    freezing = freezing or {}
    # transformers 4 nests the CLIP parts under .text_model; transformers 5 has them on the model itself.
    parts = getattr(text_encoder, "text_model", text_encoder)
    layers = parts.encoder.layers
    train_last = _layers_to_train(freezing, len(layers), where)
    freeze_embeddings = freezing.get("freeze_embeddings")
    if freeze_embeddings is None:
        freeze_embeddings = train_last < len(layers)
    freeze_final_norm = bool(freezing.get("freeze_final_layer_norm"))

    frozen = [layers[:len(layers) - train_last]]
    if freeze_embeddings:
        frozen.append(parts.embeddings)
    if freeze_final_norm:
        frozen.append(parts.final_layer_norm)
    for module in frozen:
        module.requires_grad_(False)
    checkpointing = any(getattr(module, "gradient_checkpointing", False) for module in text_encoder.modules())
    if freeze_embeddings and checkpointing:
        # transformers 4 checkpoints re-entrantly, which gives the layers no gradients when their input does not
        # require one (transformers 5 sets this hook itself).
        text_encoder.enable_input_require_grads()

    trainable = sum(p.numel() for p in text_encoder.parameters() if p.requires_grad)
    total = sum(p.numel() for p in text_encoder.parameters())
    what = [f"last {train_last} of {len(layers)} layers" if train_last < len(layers) else f"all {len(layers)} layers",
            f"embeddings {'frozen' if freeze_embeddings else 'trained'}",
            f"final layer norm {'frozen' if freeze_final_norm else 'trained'}"]
    return f"training {trainable:,} of {total:,} parameters ({', '.join(what)})"


def _layers_to_train(freezing: dict, layer_count: int, where: str) -> int:
    last, front = freezing.get("unfreeze_last_n_layers"), freezing.get("freeze_front_n_layers")
    if last is not None:
        key, value = "unfreeze_last_n_layers", last
    elif front is not None:
        key, value = "freeze_front_n_layers", front
        last = -front if front < 0 else layer_count - front
    else:
        return layer_count
    if not 1 <= last <= layer_count:
        raise ConfigError(f"{where}: text_encoder_freezing.{key} {value} does not fit this text encoder's "
                          f"{layer_count} layers (it would train {last}). Use unfreeze_last_n_layers between 1 and "
                          f"{layer_count}.")
    return last
