"""Turn an epoch plan into tensors: a Dataset whose items are whole batches, and its DataLoader.

One item = one planned batch, so data-loader workers decode whole batches in parallel and a batch
can never mix buckets (the DataLoader does no batching of its own: batch_size=None).

Reproducibility: each sample draws from its own `random.Random` seeded from (seed, epoch, step,
slot, purpose) as a string (str seeds are hashed with SHA-512, not Python's per-process hash), so
crops and caption dropout are the same whatever the worker count, worker order or restarts.
Separate purposes ("crop", "dropout") keep one stream's draws from shifting another's when a later
version adds a draw (flip, tag shuffling).
"""

from __future__ import annotations

import os
import random
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from data.batching import Batch
from data.images import load_training_image
from data.records import ImageRecord

# What cond_dropout replaces a caption with (REFERENCE §2.6): a single space, not an empty string.
DROPPED_CAPTION = " "


def sample_rng(seed: int, epoch: int, step: int, slot: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{epoch}:{step}:{slot}:{purpose}")


class EpochBatches(Dataset):
    """The batches of one epoch plan; `dataset[step]` is the whole batch for that step."""

    def __init__(self, plan: Sequence[Batch], records: Sequence[ImageRecord], tokenizer,
                 cond_dropout: float, seed: int, epoch: int, crop_jitter: bool = True):
        self.plan = list(plan)
        self.records = records
        self.tokenizer = tokenizer
        self.cond_dropout = float(cond_dropout)
        self.seed = seed
        self.epoch = epoch
        self.crop_jitter = crop_jitter  # off for validation (§2.9)

    def __len__(self) -> int:
        return len(self.plan)

    def caption_for(self, step: int, slot: int, record: ImageRecord) -> str:
        p = self.cond_dropout if record.cond_dropout is None else record.cond_dropout
        if p > 0 and sample_rng(self.seed, self.epoch, step, slot, "dropout").random() < p:
            return DROPPED_CAPTION
        return str(record.caption)

    def __getitem__(self, step: int) -> dict:
        batch = self.plan[step]
        pixels, captions, loss_scale = [], [], []
        for slot, index in enumerate(batch.indices):
            record = self.records[index]
            rng = sample_rng(self.seed, self.epoch, step, slot, "crop")
            pixels.append(load_training_image(record.path, batch.bucket, rng, self.crop_jitter))
            captions.append(self.caption_for(step, slot, record))
            loss_scale.append(record.loss_scale)
        input_ids = self.tokenizer(
            captions, padding="max_length", truncation=True,
            max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return {
            "pixel_values": torch.stack(pixels),
            "input_ids": input_ids.long(),
            "captions": captions,
            "runt_size": batch.runt_size,
            "loss_scale": torch.tensor(loss_scale, dtype=torch.float32),
        }


def _init_worker(worker_id: int) -> None:
    # Each worker decodes whole images in Python/PIL; letting each also start a full torch thread
    # pool oversubscribes the CPU that the other workers and the training process need.
    torch.set_num_threads(1)


def make_epoch_loader(plan: Sequence[Batch], records: Sequence[ImageRecord], tokenizer,
                      cond_dropout: float, seed: int, epoch: int, num_workers: int = 0,
                      pin_memory: bool = False, crop_jitter: bool = True) -> DataLoader:
    """A DataLoader yielding the plan's batches in order, one dict per step (see EpochBatches).

    Workers are not persistent: a new plan is built every epoch, so each epoch gets a new loader.
    The loader has its own torch.Generator, so creating and iterating it draws nothing from the
    global torch RNG (training noise/timesteps stay reproducible) and worker seeds are fixed for
    (seed, epoch); torch then gives every worker a distinct seed (base + worker id) for torch,
    random and numpy, so workers never share an RNG stream. Our own randomness ignores those
    anyway (see sample_rng).
    """
    if num_workers > 0:
        # The fast (Rust) CLIP tokenizer may have used threads in this process; forking then can
        # deadlock a worker. Single-threaded tokenizing of 77-token captions costs nothing.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return DataLoader(
        EpochBatches(plan, records, tokenizer, cond_dropout, seed, epoch, crop_jitter),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=_init_worker if num_workers > 0 else None,
        generator=generator,
    )


def write_schedule(path: str, plan: Sequence[Batch], records: Sequence[ImageRecord]) -> None:
    """REFERENCE §3.5: one line per item in training order,
    `step:00000, wh:[w, h], r:<runt_size>, path:<absolute path>`."""
    with open(path, "w", encoding="utf-8") as f:
        for step, batch in enumerate(plan):
            w, h = batch.bucket
            for index in batch.indices:
                f.write(f"step:{step:05d}, wh:[{w}, {h}], r:{batch.runt_size}, "
                        f"path:{os.path.abspath(records[index].path)}\n")
