"""Validation: the loss on images the model does not train on, measured the same way every time (REFERENCE §4).

A validation JSON (`validation_config`) defines the sets to evaluate: `val` (an automatic split of the
training images, or a folder of its own), extra named folders, and `stabilize-train` (a fixed subset of the
training images that stays in training). A pass computes, for each set, the plain MSE between the UNet's
prediction and its target, weighted by the images' masks as training weighs them (doc/DATA.md). The VAE sample,
noise and timesteps come from a private generator seeded with the config's seed at the start of every set, so two
passes over the same weights give the same number: a change in the curve is a change in the model, not in the draw.
Training randomness is untouched (the global RNGs are neither read nor reseeded).

Use from train.py (everything but `run` works before any model is loaded):
    vcfg = load_validation_config(path)
    records, sets = split_records(records, vcfg, resolution)
    validator = Validator(vcfg, sets, StepSettings.from_args(args))
    validator.run(...) before the first step, then after every step where validator.due(...) is true.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data
from data.records import DEFAULT_BATCH_ID
from data.settings import DEFAULT_MASK_SUFFIX
from utils.options.config import ConfigError, read_json_object
from utils.options.values import boolean, integer, number, proportion, unknown_key
from utils.objective.objectives import mask_weights, noised_and_target, per_sample_mean, sample_noise, \
    sample_timesteps
from utils.objective.prediction import predict
from utils.objective.step import StepSettings, encode_images, encode_text

log = logging.getLogger(__name__)

VAL = "val"
STABILIZE = "stabilize-train"
COMBINED = "_all_val_combined"
SPLIT_MODES = ("automatic", "manual", "none")
# EveryDream2's earlier names, still found in its shipped validation_default.json.
ALIASES = {"val_data_root": "manual_data_root", "val_split_proportion": "auto_split_proportion"}
# The template's prose block: documentation for people, never settings.
IGNORED_KEYS = ("documentation",)
# Divergence hint (§4.2): judged only once a set has this many values, over this many most recent ones.
DIVERGENCE_MIN_PASSES = 12
DIVERGENCE_WINDOW = 5


@dataclass(frozen=True)
class ValidationConfig:
    """The validated contents of a validation JSON; `path` is kept for messages."""

    path: str
    validate_training: bool = True
    val_split_mode: str = "automatic"
    auto_split_proportion: float = 0.15
    manual_data_root: str | None = None
    extra_manual_datasets: dict[str, str] = field(default_factory=dict)
    stabilize_training_loss: bool = False
    stabilize_split_proportion: float = 0.15
    every_n_epochs: float = 1.0
    seed: int = 555
    batch_size: int | None = None  # None: the training batch_size
    use_relative_loss: bool = False

    def has_val_set(self) -> bool:
        return self.validate_training and (
            self.val_split_mode == "automatic" or
            self.val_split_mode == "manual" and self.manual_data_root is not None)


KEYS = tuple(f.name for f in dataclasses.fields(ValidationConfig) if f.name != "path")


# -- loading the JSON --------------------------------------------------------------------------------------------

def _path(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: key '{key}' must be a folder or manifest .json path (a string), got "
                          f"{json.dumps(value)}.")
    return value


def _require_dataset(where: str, key: str, value: str) -> None:
    """The forms data.scan reads, as for data_root: a folder, or a manifest .json file."""
    if not (os.path.isdir(value) or os.path.isfile(value) and value.lower().endswith(".json")):
        raise ConfigError(f"{where}: {key} '{value}' is neither a folder nor a manifest .json file (paths are "
                          "relative to the working directory). Point it at images laid out like data_root.")


def load_validation_config(path: str | os.PathLike) -> ValidationConfig:
    """Reads and checks a validation JSON (REFERENCE §4); raises ConfigError naming the file, the key and the fix.

    Missing keys and JSON nulls take the defaults. Folders are checked here, so a typo stops the run before any
    model loads; the images in them are read by `split_records`.
    """
    where = str(path)
    raw = read_json_object(Path(path), "Paths are relative to the working directory. Fix the path, or remove "
                           "validation_config to train without validation.",
                           "validation settings (see cfgs/validation.json for an example)")
    cfg = ValidationConfig(path=where, **_checked_values(where, _current_names(where, raw)))
    _check_together(cfg)
    return cfg


def _current_names(where: str, raw: dict) -> dict[str, Any]:
    """The file's keys under their current names (old names warned about), documentation and nulls dropped."""
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in IGNORED_KEYS:
            continue
        if key in ALIASES:
            new = ALIASES[key]
            if new in raw:
                raise ConfigError(f"{where}: both '{key}' and '{new}' are set; '{key}' is the old name of '{new}'. "
                                  f"Keep only '{new}'.")
            log.warning("%s: '%s' is the old name of '%s'; rename it (it still works).", where, key, new)
            key = new
        elif key not in KEYS:
            raise unknown_key(where, key, KEYS + tuple(ALIASES), otherwise=f" Valid keys: {', '.join(KEYS)}.")
        if value is not None:
            values[key] = value
    return values


def _checked_values(where: str, values: dict[str, Any]) -> dict[str, Any]:
    checked: dict[str, Any] = {}
    for key in ("validate_training", "stabilize_training_loss", "use_relative_loss"):
        if key in values:
            checked[key] = boolean(where, key, values[key], quoted=True)
    for key in ("auto_split_proportion", "stabilize_split_proportion"):
        if key in values:
            checked[key] = proportion(where, key, values[key], "0.15 = 15% of the training images")
    if "val_split_mode" in values:
        mode = values["val_split_mode"]
        if mode not in SPLIT_MODES:
            raise ConfigError(f"{where}: key 'val_split_mode' is {json.dumps(mode)}; choose one of: "
                              f"{', '.join(SPLIT_MODES)}.")
        checked["val_split_mode"] = mode
    if "every_n_epochs" in values:
        n = number(where, "every_n_epochs", values["every_n_epochs"])
        if n <= 0:
            raise ConfigError(f"{where}: key 'every_n_epochs' is {values['every_n_epochs']}; it must be above 0 "
                              "(1 = every epoch, 2 = every second epoch, 0.5 = twice per epoch).")
        checked["every_n_epochs"] = n
    if "seed" in values:
        checked["seed"] = integer(where, "seed", values["seed"], 0,
                                  "validation needs a fixed seed so that passes compare; -1 is not random here")
    if "batch_size" in values:
        checked["batch_size"] = integer(where, "batch_size", values["batch_size"], 1, "images per batch")
    if "manual_data_root" in values:
        # Its folder is checked below, only if the mode uses it: a stale path in an ignored key is no error.
        checked["manual_data_root"] = _path(where, "manual_data_root", values["manual_data_root"])
    if "extra_manual_datasets" in values:
        extra = values["extra_manual_datasets"]
        if not isinstance(extra, dict):
            raise ConfigError(f"{where}: key 'extra_manual_datasets' must be an object of name to folder, e.g. "
                              f'{{"santa_suit": "val/santa"}}, got {json.dumps(extra)}.')
        for name, folder in extra.items():
            if name in (VAL, STABILIZE, COMBINED) or not name.strip():
                raise ConfigError(f"{where}: extra_manual_datasets has a set named {json.dumps(name)}, which is "
                                  f"empty or reserved ({VAL}, {STABILIZE}, {COMBINED}); rename it.")
            key = f"extra_manual_datasets.{name}"
            _require_dataset(where, key, _path(where, key, folder))
        checked["extra_manual_datasets"] = dict(extra)
    return checked


def _check_together(cfg: ValidationConfig) -> None:
    """What depends on several keys: the manual folder where the mode uses it, sets left without validation."""
    where = cfg.path
    if cfg.validate_training and cfg.val_split_mode == "manual" and not cfg.manual_data_root and \
            not cfg.extra_manual_datasets:
        raise ConfigError(f"{where}: val_split_mode is 'manual' but neither manual_data_root nor "
                          "extra_manual_datasets is set. Set manual_data_root to a folder of validation images, "
                          "or use val_split_mode 'automatic'.")
    if cfg.has_val_set() and cfg.val_split_mode == "manual":
        _require_dataset(where, "manual_data_root", cfg.manual_data_root)
    elif cfg.manual_data_root is not None:
        log.warning("%s: manual_data_root is ignored: it is used only with val_split_mode 'manual' and "
                    "validate_training true.", where)
    still = ([STABILIZE] if cfg.stabilize_training_loss else []) + list(cfg.extra_manual_datasets)
    if not cfg.validate_training and still:
        log.warning("%s: validate_training is false, so there is no '%s' set; still evaluated: %s. Remove "
                    "validation_config to turn validation off.", where, VAL, ", ".join(still))


# -- building the sets ---------------------------------------------------------------------------------------------

def _as_validation_item(record: data.ImageRecord) -> data.ImageRecord:
    """What a validation image is evaluated as (§4.1): once per pass, unflipped, ungrouped, unweighted, caption
    never dropped (the loader is given cond_dropout 0 and no per-image value overrides it)."""
    return dataclasses.replace(record, multiply=1.0, flip_p=0.0, batch_id=DEFAULT_BATCH_ID, loss_scale=1.0,
                               cond_dropout=None)


def _seeded_pick(records: Sequence[data.ImageRecord], proportion: float,
                 rng: random.Random) -> list[data.ImageRecord]:
    """max(1, ceil(p*N)) records: sorted by path first so the pick depends only on the files and the seed,
    not on scan order."""
    ordered = sorted(records, key=lambda r: r.path)
    rng.shuffle(ordered)
    return ordered[:max(1, math.ceil(proportion * len(ordered)))]


def _scan_set(where: str, key: str, folder: str, resolution: int, mask_suffix: str) -> list[data.ImageRecord]:
    result = data.scan(folder, mask_suffix)
    for line in result.summary_lines():
        log.warning("%s: %s: %s", where, key, line)
    if not result.records:
        raise data.DataError(f"{where}: {key} '{folder}' has no usable images. Put captioned images there "
                             "(as in data_root), or remove the key.")
    return [_as_validation_item(r) for r in data.assign_buckets(result.records, resolution)]


def split_records(records: Sequence[data.ImageRecord], cfg: ValidationConfig, resolution: int,
                  mask_suffix: str = DEFAULT_MASK_SUFFIX
                  ) -> tuple[list[data.ImageRecord], dict[str, list[data.ImageRecord]]]:
    """(training records, {set name: records}) for `cfg` (§4.1). `records` are the bucketed training images;
    folders of their own are scanned with `mask_suffix`, as data_root is.

    `val` images are removed from training: drawn from it (automatic), or, for a manual folder, any training
    image that is the same file. `stabilize-train` images are drawn from what remains and stay in training.
    Extra sets are evaluated as given; overlap with training is only warned about, since watching the loss
    on chosen training images can be the point of an extra set. The result depends only on the files and
    `cfg.seed`; the global random state is not used.
    """
    where = cfg.path
    train = list(records)
    sets: dict[str, list[data.ImageRecord]] = {}
    rng = random.Random(cfg.seed)
    if cfg.has_val_set() and cfg.val_split_mode == "automatic":
        picked = _seeded_pick(train, cfg.auto_split_proportion, rng)
        if len(picked) >= len(train):
            raise data.DataError(
                f"{where}: auto_split_proportion {cfg.auto_split_proportion} of {len(train)} training image(s) "
                f"leaves none to train on. Add images, or use val_split_mode 'manual' with a folder of its own.")
        held_out = {r.path for r in picked}
        train = [r for r in train if r.path not in held_out]
        sets[VAL] = [_as_validation_item(r) for r in picked]
        log.info("Validation: %d of %d images held out of training as '%s'", len(picked), len(records), VAL)
    elif cfg.has_val_set():
        sets[VAL] = _scan_set(where, "manual_data_root", cfg.manual_data_root, resolution, mask_suffix)
        val_files = {os.path.realpath(r.path) for r in sets[VAL]}
        overlap = [r for r in train if os.path.realpath(r.path) in val_files]
        if len(overlap) == len(train):
            raise data.DataError(f"{where}: every training image is also in manual_data_root "
                                 f"'{cfg.manual_data_root}'. Use a folder outside data_root for validation.")
        if overlap:
            log.warning("%s: %d training image(s) are also in manual_data_root (e.g. %s); they are left out of "
                        "training so validation stays held out. Move the validation folder out of data_root.",
                        where, len(overlap), overlap[0].path)
            train = [r for r in train if os.path.realpath(r.path) not in val_files]
        log.info("Validation: '%s' = %d images from %s", VAL, len(sets[VAL]), cfg.manual_data_root)
    if cfg.stabilize_training_loss:
        sets[STABILIZE] = [_as_validation_item(r) for r in _seeded_pick(train, cfg.stabilize_split_proportion, rng)]
        log.info("Validation: '%s' = %d training images (they keep training)", STABILIZE, len(sets[STABILIZE]))
    train_files = {os.path.realpath(r.path) for r in train}
    for name, folder in cfg.extra_manual_datasets.items():
        sets[name] = _scan_set(where, f"extra_manual_datasets.{name}", folder, resolution, mask_suffix)
        shared = sum(os.path.realpath(r.path) in train_files for r in sets[name])
        if shared:
            log.warning("%s: %d image(s) of extra set '%s' are also training images: its loss shows how well "
                        "training images are fitted, not how the model generalises.", where, shared, name)
        log.info("Validation: '%s' = %d images from %s", name, len(sets[name]), folder)
    if not sets:
        log.warning("%s: no validation set is defined (validate_training is false, no stabilize_training_loss, "
                    "no extra_manual_datasets): no validation passes will run.", where)
    return train, sets


# -- the passes ----------------------------------------------------------------------------------------------------

class Validator:
    """Runs validation passes over prebuilt sets and logs them; see the module docstring for use."""

    def __init__(self, cfg: ValidationConfig, sets: dict[str, list[data.ImageRecord]], training: StepSettings,
                 num_workers: int = 0, rank: int = 0, processes: int = 1):
        """`training`: the training step's settings at the start of the run. Passes use its timestep range,
        pyramid noise, clip_skip (what the model is trained to do) and mask weighting (what it is trained on) and
        none of its loss shaping. They are kept as given, so a live settings change mid-run does not make later
        passes incomparable to earlier.

        With several training processes, process `rank` of `processes` evaluates batches rank, rank + processes,
        ... of each set and the sums are combined across processes; every process must then call `run`."""
        self.cfg = cfg
        self.rank, self.processes = rank, processes
        self.training = dataclasses.replace(training)
        self.batch_size = cfg.batch_size or training.batch_size
        self.num_workers = num_workers
        self.sets = dict(sets)
        # Built once: every pass sees the same batches in the same order, like the same noise.
        self.plans = {name: data.build_epoch_batches(records, self.batch_size, cfg.seed, epoch=0)
                      for name, records in self.sets.items()}
        self.history: dict[str, list[float]] = {name: [] for name in self.sets}
        self.first: dict[str, float] = {}  # tag -> value at the first pass, for use_relative_loss
        self.skipped = data.SkippedFiles()  # images that fail to decode, warned about once per run, not per pass

    def due(self, epoch: int, local_step: int, steps_per_epoch: int) -> bool:
        """Whether a pass follows the step just finished (0-based `local_step` of `epoch`), §4.2.

        every_n_epochs >= 1: after the last step of every n-th epoch. Below 1: the epoch is cut into
        round(1/n) parts and a pass follows the last step of each part; with more parts than steps, that is
        every step. The pass before training is not covered here: call `run` once before the first step.
        """
        if not self.sets:
            return False
        n = self.cfg.every_n_epochs
        if n >= 1:
            return local_step == steps_per_epoch - 1 and (epoch + 1) % n == 0
        divisions = max(1, round(1 / n))
        # Pass i follows step ceil((i+1)*S/d) - 1, so floor((k+1)*d/S) passes are done once step k is; a pass
        # follows step k exactly when that count goes up at k (for d >= S it goes up at every step).
        return (local_step + 1) * divisions // steps_per_epoch > local_step * divisions // steps_per_epoch

    @torch.no_grad()
    def _set_loss(self, name: str, unet, text_encoder, vae, noise_scheduler, tokenizer, autocast) -> float:
        """Mean over the set's images of each image's (mask-weighted) MSE; padding duplicates in a runt batch are not
        counted, so every image weighs the same. Batch k's draws come from a generator seeded with (seed, k), so the
        result is the same whichever process evaluates which batch."""
        plan, records = self.plans[name], self.sets[name]
        steps = range(self.rank, len(plan), self.processes)
        loader = data.make_epoch_loader(plan, records, tokenizer, cond_dropout=0.0, seed=self.cfg.seed, epoch=0,
                                        num_workers=self.num_workers, crop_jitter=False, skipped=self.skipped,
                                        steps=steps)
        total, count = torch.zeros((), device=vae.device), torch.zeros((), device=vae.device)
        for step, batch in zip(steps, tqdm(loader, desc=f"validate {name}", unit="step", leave=False,
                                           dynamic_ncols=True, disable=self.rank != 0)):
            generator = torch.Generator(device=vae.device).manual_seed(self.cfg.seed + (step << 32))
            with autocast():
                # Its own generator: repeatable passes that leave training's random state untouched.
                latents = encode_images(vae, batch["pixel_values"], generator).float()
                hidden = encode_text(text_encoder, batch["input_ids"], self.training.clip_skip)
                noise = sample_noise(latents, 0.0, self.training.pyramid_noise_discount, generator=generator)
                timesteps = sample_timesteps(latents.shape[0], self.training.timestep_start,
                                             self.training.timestep_end, latents.device, generator=generator)
                noisy, target = noised_and_target(noise_scheduler, latents, noise, timesteps,
                                                  self.training.rectified_flow)
                pred = predict(unet, noisy, timesteps, hidden)
            per_image = per_sample_mean(F.mse_loss(pred.float(), target.float(), reduction="none"),
                                        mask_weights(batch.get("loss_mask"), latents,
                                                     self.training.masked_loss_unmasked_weight))
            real = batch["runt_size"] or len(per_image)
            total += per_image[:real].sum()  # kept on the device: one host sync per set, not per batch
            count += real
        if self.processes > 1:
            sums = torch.stack([total, count])
            torch.distributed.all_reduce(sums)
            total, count = sums
        return (total / count).item()

    def run(self, unet, text_encoder, vae, noise_scheduler, tokenizer, global_step: int, tb_writer,
            autocast) -> dict[str, float]:
        """One pass over every set; logs `loss/<set>` (and `loss/_all_val_combined` for several sets, and the
        `_relative` twins with use_relative_loss) at `global_step`. Returns {set name: loss}.

        `autocast` is a callable returning a context manager (accelerator.autocast). The models are put in eval
        mode for the pass and given back in the mode they were in. With several processes, pass the models
        unwrapped from DistributedDataParallel (processes may run different numbers of batches, and a wrapped
        model's forward synchronises them) and a `tb_writer` only to the first process: None writes nothing.
        """
        was_training = (unet.training, text_encoder.training)
        unet.eval()
        text_encoder.eval()
        try:
            losses = {name: self._set_loss(name, unet, text_encoder, vae, noise_scheduler, tokenizer, autocast)
                      for name in self.sets}
        finally:
            unet.train(was_training[0])
            text_encoder.train(was_training[1])

        scalars = {f"loss/{name}": loss for name, loss in losses.items()}
        if len(losses) > 1:
            scalars[f"loss/{COMBINED}"] = sum(losses.values()) / len(losses)
        if self.cfg.use_relative_loss:
            for tag, value in list(scalars.items()):
                scalars[f"{tag}_relative"] = value / self.first.setdefault(tag, value)
        for tag, value in scalars.items() if tb_writer is not None else ():
            tb_writer.add_scalar(tag, value, global_step)
        if losses:
            log.info("Validation at step %d: %s", global_step,
                     ", ".join(f"{name} {loss:.5f}" for name, loss in losses.items()))
        for name, loss in losses.items():
            self._divergence_hint(name, loss, global_step)
        return losses

    def _divergence_hint(self, name: str, loss: float, global_step: int) -> None:
        """§4.2: warn when a held-out set's loss has been rising on average over its last passes (overfitting).
        stabilize-train is training data, so a rise there says nothing about overfitting."""
        history = self.history[name]
        history.append(loss)
        if name == STABILIZE or len(history) < DIVERGENCE_MIN_PASSES:
            return
        recent = history[-DIVERGENCE_WINDOW:]
        if recent[-1] > recent[0]:  # the mean of successive differences is (last - first) / (window - 1)
            log.warning("Validation loss '%s' has risen over its last %d passes (%.5f -> %.5f at step %d): the "
                        "model may be overfitting. Consider stopping, a lower learning rate, or an earlier "
                        "checkpoint.", name, DIVERGENCE_WINDOW, recent[0], recent[-1], global_step)


class ValidationPasses:
    """The loop's part for validation: a pass before training (unless resuming), after the steps `Validator.due`
    names, and after each reflow iteration. Every process takes part in a pass."""

    def __init__(self, validator: Validator, model, noise_scheduler, accelerator, run):
        self.validator, self.model, self.noise_scheduler, self.accelerator = validator, model, noise_scheduler, accelerator
        self.tb = run.tb if run else None

    def training_start(self, trainer) -> None:
        if not trainer.resumed:
            self.validate(0)

    def step_end(self, trainer, batch, out) -> None:
        if trainer.phase == "epochs" and self.validator.due(trainer.epoch, trainer.next_step - 1,
                                                            trainer.steps_in_epoch):
            self.validate(trainer.global_step)

    def reflow_iteration_end(self, trainer) -> None:
        self.validate(trainer.global_step)

    def validate(self, step: int) -> None:
        unwrap = self.accelerator.unwrap_model
        self.validator.run(unwrap(self.model.unet), unwrap(self.model.text_encoder), self.model.vae,
                           self.noise_scheduler, self.model.tokenizer, step, self.tb, self.accelerator.autocast)

    def state_dict(self) -> dict:
        return {"validation": {"history": self.validator.history, "first": self.validator.first}}

    def load_state_dict(self, state) -> None:
        if state.validation:
            self.validator.history, self.validator.first = state.validation["history"], state.validation["first"]
