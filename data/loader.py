"""Turn an epoch plan into tensors: a Dataset whose items are whole batches, and its DataLoader.

One item = one planned batch, so data-loader workers decode whole batches in parallel and a batch
can never mix buckets (the DataLoader does no batching of its own: batch_size=None).

Reproducibility: every random choice about a sample — crop, flip, tag order, caption dropout — is
drawn from its own `random.Random` seeded from (seed, epoch, step, slot, purpose) as a string (str
seeds are hashed with SHA-512, not Python's per-process hash). So the choices are the same whatever
the worker count, worker order, restarts or number of training processes (a slot is numbered within
the planned batch: one process's share of it starts at `Batch.first_slot`), and `write_schedule`
can show exactly what each slot is trained with by calling the same `EpochBatches.sample` the
workers call. Separate purposes keep one stream's draws from shifting another's.

Plugins (utils/plugins, doc/PLUGINS.md): their caption transform runs on the assembled caption (tags
shuffled), before caption dropout and tokenizing; their image transform on the cropped, resized and
flipped PIL image, before it becomes the [-1, 1] tensor. Without plugins nothing changes.

Masks (doc/DATA.md): an image's mask is cut with its image's crop box (drawn again from a generator in the
state the image's was drawn from), resized and flipped with it; a batch with any masked image carries
`loss_mask`, a batch without none, so it trains exactly as before masks existed.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from data.batching import Batch
from data.captions import assemble_caption
from data.images import load_training_image, load_training_mask, training_crop
from data.latent_cache import LatentCache, collate_slots, content_hash, crop_rng
from data.records import DataError, ImageRecord, SkippedFiles, without_path

if TYPE_CHECKING:
    from utils.plugins import PluginRunner

log = logging.getLogger(__name__)

# What cond_dropout replaces a caption with (REFERENCE §2.6): a single space, not an empty string.
DROPPED_CAPTION = " "


def sample_rng(seed: int, epoch: int, step: int, slot: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{epoch}:{step}:{slot}:{purpose}")


@dataclass(frozen=True)
class SampleOptions:
    """The run-wide settings of per-sample randomness. Per-image values (flip_p, cond_dropout,
    shuffle_tags from folder files and sidecars) override the first three image by image."""

    cond_dropout: float = 0.0
    flip_p: float = 0.0
    shuffle_tags: bool = False
    keep_tags: int = 0
    crop_jitter: bool = True   # off for validation (§2.9)


class EpochBatches(Dataset):
    """The batches of one epoch plan; `dataset[step]` is the whole batch for that step."""

    def __init__(self, plan: Sequence[Batch], records: Sequence[ImageRecord], tokenizer,
                 options: SampleOptions, seed: int, epoch: int, latent_cache: Optional[LatentCache] = None,
                 plugins: Optional["PluginRunner"] = None):
        if latent_cache is not None and plugins and plugins.changes_images:
            # cached latents were encoded from untransformed pixels, and new entries would store transformed ones
            raise ValueError("a plugin transforms images (%s): load the batches without the latent cache"
                             % ", ".join(plugins.names))
        self.plan = list(plan)
        self.latent_cache = latent_cache
        self.plugins = plugins if plugins else None
        self.records = records
        self.tokenizer = tokenizer
        self.options = options
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.plan)

    def _rng(self, step: int, slot: int, purpose: str) -> random.Random:
        return sample_rng(self.seed, self.epoch, step, slot, purpose)

    def sample(self, step: int, slot: int, index: int) -> tuple[str, bool]:
        """(caption as trained, flipped?) for record `index` in slot `slot` of step `step`.

        With plugins, their caption transform sees every assembled caption, dropped or not (as in
        EveryDream2), so a plugin's view of the data does not depend on which captions dropout hits."""
        record, opts = self.records[index], self.options
        flip_p = opts.flip_p if record.flip_p is None else record.flip_p
        flip = flip_p > 0 and self._rng(step, slot, "flip").random() < flip_p
        dropout = opts.cond_dropout if record.cond_dropout is None else record.cond_dropout
        dropped = dropout > 0 and self._rng(step, slot, "dropout").random() < dropout
        if dropped and self.plugins is None:
            return DROPPED_CAPTION, flip
        shuffle = opts.shuffle_tags or record.shuffle_tags
        caption = assemble_caption(record.caption, shuffle, opts.keep_tags,
                                   record.max_caption_length,
                                   self._rng(step, slot, "tags") if shuffle else None)
        if self.plugins is not None:
            caption = self.plugins.transform_caption(caption)
        return (DROPPED_CAPTION if dropped else caption), flip

    def _crop_draws(self, step: int, slot: int, content: Optional[str]) -> random.Random:
        """The generator a sample's crop is drawn from: its own, or with the latent cache one per image content,
        so that each image keeps one crop across epochs and runs (data/latent_cache.py)."""
        return self._rng(step, slot, "crop") if content is None else crop_rng(content)

    def _load(self, step: int, slot: int, index: int, bucket) -> dict:
        """{caption, loss_scale} and either the image's `pixels` or, from the latent cache, its
        `latent_params` (a cache miss also names the `entry` its latents are to be stored in); for an
        image with a mask, its `mask`, or the `mask_problem` that leaves the image without one."""
        caption, flip = self.sample(step, slot, index)
        record = self.records[index]
        item = {"caption": caption, "loss_scale": record.loss_scale}
        content = None
        if self.latent_cache is None:
            transform = self.plugins.transform_pil_image if self.plugins and self.plugins.changes_images else None
            item["pixels"] = load_training_image(record.path, bucket, self._crop_draws(step, slot, content),
                                                 self.options.crop_jitter, flip, transform)
        else:
            try:
                content = content_hash(record.path)
            except OSError as e:
                raise DataError(f"{record.path}: cannot read the file ({e})") from e
            item.update(self._load_cached(record, content, bucket, flip))
        if record.mask_path is not None:
            item.update(self._load_mask(record, bucket, self._crop_draws(step, slot, content), flip))
        return item

    def _load_cached(self, record: ImageRecord, content: str, bucket, flip: bool) -> dict:
        box = training_crop(record.path, bucket, crop_rng(content), self.options.crop_jitter).box
        entry = self.latent_cache.entry(content, bucket, box, flip)
        params = self.latent_cache.load(entry)
        if params is not None:
            return {"latent_params": params}
        return {"pixels": load_training_image(record.path, bucket, crop_rng(content), self.options.crop_jitter, flip),
                "entry": entry}

    def _load_mask(self, record: ImageRecord, bucket, crop_draws: random.Random, flip: bool) -> dict:
        """{"mask"}, cut where the image was (`crop_draws` is in the state the image's crop was drawn from), or
        {"mask_problem"}: a mask that cannot be decoded leaves its image to train without one."""
        crop = training_crop(record.path, bucket, crop_draws, self.options.crop_jitter)
        try:
            return {"mask": load_training_mask(record.mask_path, crop, bucket, flip)}
        except DataError as e:
            return {"mask_problem": (record.mask_path, without_path(str(e), record.mask_path))}

    def __getitem__(self, step: int) -> dict:
        batch = self.plan[step]
        slots: list[Optional[dict]] = []
        skipped: list[tuple[str, str]] = []
        for slot, index in enumerate(batch.indices, start=batch.first_slot):
            try:
                slots.append(self._load(step, slot, index, batch.bucket))
            except DataError as e:
                path = self.records[index].path
                skipped.append((path, without_path(str(e), path)))
                slots.append(None)
        if skipped:
            slots = self._fill_failed(step, batch, slots, skipped)
        captions = [s["caption"] for s in slots]
        input_ids = token_ids(self.tokenizer, captions)
        images = {"pixel_values": torch.stack([s["pixels"] for s in slots])} if self.latent_cache is None \
            else collate_slots(slots)
        return {
            **images,
            **loss_masks(slots, batch.bucket),
            "input_ids": input_ids.long(),
            "captions": captions,
            "runt_size": batch.runt_size,
            "loss_scale": torch.tensor([s["loss_scale"] for s in slots], dtype=torch.float32),
            "skipped": skipped,
        }

    def _fill_failed(self, step: int, batch: Batch, slots: list, skipped: list) -> list:
        """A file that passed the header scan but cannot be decoded (truncated or corrupt data)
        must not stop training: its slot takes a duplicate of an image of the batch that did
        decode, as runt padding does; if none did, of another image of the same bucket."""
        good = [s for s in slots if s is not None]
        if not good:
            failed = {path for path, _ in skipped}
            for index, record in enumerate(self.records):
                if record.bucket != batch.bucket or record.path in failed:
                    continue
                try:
                    good = [self._load(step, batch.first_slot, index, batch.bucket)]
                    break
                except DataError as e:
                    skipped.append((record.path, without_path(str(e), record.path)))
                    failed.add(record.path)
            else:
                w, h = batch.bucket
                raise DataError(f"no image of bucket {w}x{h} can be decoded (e.g. {skipped[0][0]}: "
                                f"{skipped[0][1]}); fix or remove those files")
        return [s if s is not None else good[n % len(good)] for n, s in enumerate(slots)]


def token_ids(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """The text encoder's input for `texts`, as training feeds it: padded and cut to the tokenizer's length."""
    return tokenizer(list(texts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def loss_masks(slots: list[dict], bucket) -> dict:
    """Nothing for a batch without masks, so it trains exactly as before masks existed; else `loss_mask`, every
    slot's mask ([N, 1, h, w] uint8, all 255 for a slot without one), and the `mask_problems` that left images
    without theirs."""
    masks = {}
    if any("mask" in s for s in slots):
        w, h = bucket
        unmasked = torch.full((1, h, w), 255, dtype=torch.uint8)
        masks["loss_mask"] = torch.stack([s.get("mask", unmasked) for s in slots])
    problems = [s["mask_problem"] for s in slots if "mask_problem" in s]
    if problems:
        masks["mask_problems"] = problems
    return masks


class EpochLoader:
    """The epoch's DataLoader, which also reports each image or mask that fails to decode, once per run
    (workers find a broken file again every epoch; `skipped` remembers it)."""

    def __init__(self, loader: DataLoader, skipped: SkippedFiles):
        self.loader = loader
        self.skipped = skipped

    @property
    def dataset(self) -> EpochBatches:
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            for path, reason in batch.pop("skipped"):
                if self.skipped.add(path, reason):
                    log.warning("skipped %s: %s; its batches use a duplicate of another image "
                                "instead", path, reason)
            for path, reason in batch.pop("mask_problems", ()):
                if self.skipped.add(path, reason):
                    log.warning("skipped mask %s: %s; its image trains without a mask", path, reason)
            yield batch


def _init_worker(worker_id: int) -> None:
    # Ctrl-C reaches every process of the terminal's group: the training process decides how to stop (saving
    # first), and a worker killed by the signal would only turn that into a DataLoader crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Each worker decodes whole images in Python/PIL; letting each also start a full torch thread
    # pool oversubscribes the CPU that the other workers and the training process need.
    torch.set_num_threads(1)


def make_epoch_loader(plan: Sequence[Batch], records: Sequence[ImageRecord], tokenizer,
                      cond_dropout: float, seed: int, epoch: int, num_workers: int = 0,
                      pin_memory: bool = False, crop_jitter: bool = True, *, flip_p: float = 0.0,
                      shuffle_tags: bool = False, keep_tags: int = 0,
                      skipped: Optional[SkippedFiles] = None, start_step: int = 0,
                      steps: Optional[Sequence[int]] = None,
                      latent_cache: Optional[LatentCache] = None,
                      plugins: Optional["PluginRunner"] = None) -> EpochLoader:
    """An iterable of the plan's batches in order, one dict per step (see EpochBatches).

    Workers are not persistent: a new plan is built every epoch, so each epoch gets a new loader.
    The loader has its own torch.Generator, so creating and iterating it draws nothing from the
    global torch RNG (training noise/timesteps stay reproducible) and worker seeds are fixed for
    (seed, epoch); torch then gives every worker a distinct seed (base + worker id) for torch,
    random and numpy, so workers never share an RNG stream. Our own randomness ignores those
    anyway (see sample_rng). Pass the scan's `skipped` so decode failures join its list and are
    reported once per run rather than once per loader. `start_step` skips the plan's first steps without
    loading them (a resumed run); every later step gets the same images and randomness as it would have.
    `steps`, instead, loads exactly these steps of the plan, in this order, each as it would have been.
    With a `latent_cache`, batches carry cached latents where it has them and pixels only for the rest
    (data/latent_cache.py). `plugins` (a utils.plugins.PluginRunner) transform captions and images in
    the workers; one that transforms images cannot be combined with a latent cache (ValueError).
    A plugin's failure in a worker reaches the caller as a PluginError naming the plugin and hook.
    """
    if num_workers > 0:
        # The fast (Rust) CLIP tokenizer may have used threads in this process; forking then can
        # deadlock a worker. Single-threaded tokenizing of 77-token captions costs nothing.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + epoch) % 2**63)
    options = SampleOptions(cond_dropout=float(cond_dropout), flip_p=float(flip_p),
                            shuffle_tags=bool(shuffle_tags), keep_tags=int(keep_tags),
                            crop_jitter=crop_jitter)
    loader = DataLoader(
        EpochBatches(plan, records, tokenizer, options, seed, epoch, latent_cache, plugins),
        batch_size=None,
        sampler=range(start_step, len(plan)) if steps is None else steps,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=_init_worker if num_workers > 0 else None,
        generator=generator,
    )
    return EpochLoader(loader, SkippedFiles() if skipped is None else skipped)


def write_schedule(path, batches: EpochBatches) -> None:
    """REFERENCE §3.5, extended: one line per slot in training order,
    `step:00000, wh:[w, h], r:<runt_size>, path:<absolute path>, batch_id:<id>, flip:<0|1>,
    caption:<caption as trained>`. The caption comes last because it may contain commas; it is
    one line since captions are whitespace-normalised when read. Written from `batches.sample`,
    the function the loader trains with, so it shows exactly what each step trains."""
    # surrogateescape: a file name that is not valid UTF-8 is written back as its own bytes
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        for step, batch in enumerate(batches.plan):
            w, h = batch.bucket
            for slot, index in enumerate(batch.indices, start=batch.first_slot):
                caption, flip = batches.sample(step, slot, index)
                f.write(f"step:{step:05d}, wh:[{w}, {h}], r:{batch.runt_size}, "
                        f"path:{os.path.abspath(batches.records[index].path)}, "
                        f"batch_id:{batch.batch_id}, flip:{int(flip)}, caption:{caption}\n")
