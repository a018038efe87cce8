"""Per-epoch batch building (REFERENCE §3.3, first version).

A plan is the list of batches of one epoch, in training order. Each batch holds indices into the
record list and never mixes buckets, so its images stack into one tensor.

Randomness: one `random.Random(seed + epoch)` per build, so the plan is a pure function of
(records, batch_size, seed, epoch) — resuming at epoch N rebuilds exactly epoch N's plan, and
every epoch differs. (EveryDream2 seeds its loader with seed+1 for epoch 0 and draws in a different
order, so its exact sequences are not reproduced anyway; only the behaviour is.)
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

from data.records import ImageRecord

# A bucket is warned about when padding its runt batch would add more than this fraction of the
# bucket's own image count (REFERENCE §3.3, start-up warning).
RUNT_WARNING_FRACTION = 0.5


@dataclass(frozen=True)
class Batch:
    indices: tuple[int, ...]   # into the record list; may repeat within a padded runt batch
    bucket: tuple[int, int]    # (width, height) shared by every image of the batch
    runt_size: int = 0         # r > 0: the first r indices are real, the rest duplicates of them
    batch_id: str = "default_batch"


def _epoch_items(records: Sequence[ImageRecord], rng: random.Random) -> list[int]:
    """The record indices trained this epoch, each image once.

    This is where multiply (§2.6) and rated_dataset (§2.7) will pick the epoch's items with `rng`;
    until then `rng` is unused here so adding them changes nothing else."""
    return list(range(len(records)))


def build_epoch_batches(records: Sequence[ImageRecord], batch_size: int, seed: int,
                        epoch: int) -> list[Batch]:
    """The epoch's batches in training order.

    1. Shuffle the epoch's items.
    2. Group them by (batch_id, bucket), in order of first appearance.
    3. Cut each group into batch_size chunks. A group whose size is not a multiple of batch_size
       ends in a runt: its last r items plus random duplicates of those r items up to batch_size,
       every slot tagged runt_size=r (the loss is later scaled by (r/batch_size)^1.5). Nothing is
       dropped, so every image is seen every epoch.
    4. Shuffle the batches.
    Named batch_id surplus demotion and grad_accum packing (§3.3 steps 4, 7, 8) come with batch_id.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(seed + epoch)
    items = _epoch_items(records, rng)
    rng.shuffle(items)

    groups: dict[tuple[str, tuple[int, int]], list[int]] = {}
    for i in items:
        rec = records[i]
        if rec.bucket is None:
            raise ValueError(f"{rec.path}: no bucket assigned (call assign_buckets first)")
        groups.setdefault((rec.batch_id, rec.bucket), []).append(i)

    batches: list[Batch] = []
    for (batch_id, bucket), members in groups.items():
        full = len(members) - len(members) % batch_size
        for start in range(0, full, batch_size):
            batches.append(Batch(tuple(members[start:start + batch_size]), bucket, 0, batch_id))
        runt = members[full:]
        if runt:
            padding = [rng.choice(runt) for _ in range(batch_size - len(runt))]
            batches.append(Batch(tuple(runt + padding), bucket, len(runt), batch_id))
    rng.shuffle(batches)
    return batches


@dataclass
class PlanSummary:
    """Numbers for the start-up summary of an epoch plan."""

    images: int                    # distinct images in the plan
    steps: int                     # batches = optimizer micro-steps per epoch
    batch_size: int
    padded: int                    # slots filled with duplicates to complete runt batches
    # images per (batch_id, (w, h)), largest first
    buckets: list[tuple[tuple[str, tuple[int, int]], int]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.images} images, {self.steps} steps per epoch at batch size "
               f"{self.batch_size}, {self.padded} duplicated to fill runt batches"]
        for (batch_id, (w, h)), count in self.buckets:
            label = "" if batch_id == "default_batch" else f" [{batch_id}]"
            out.append(f"  bucket {w}x{h}{label}: {count} images")
        return out + self.warnings


def epoch_plan_summary(plan: Sequence[Batch], batch_size: int) -> PlanSummary:
    """Summarise a plan: image and step counts, per-bucket counts, runt padding, and the §3.3
    warning for buckets where padding adds more than half again of their images (those images are
    effectively trained that much more often)."""
    per_bucket: Counter = Counter()
    distinct: set[int] = set()
    padded = 0
    for batch in plan:
        real = batch.indices[:batch.runt_size] if batch.runt_size else batch.indices
        per_bucket[(batch.batch_id, batch.bucket)] += len(real)
        distinct.update(real)
        padded += len(batch.indices) - len(real)

    warnings = []
    for (batch_id, (w, h)), count in per_bucket.items():
        missing = (batch_size - count % batch_size) % batch_size
        if missing / count > RUNT_WARNING_FRACTION:
            aspect = Fraction(w, h)
            warnings.append(
                f"bucket {w}x{h} ({aspect.numerator}:{aspect.denominator}, {batch_id}) has only "
                f"{count} image(s) for batch size {batch_size}: duplicates fill the batch, an "
                f"effective multiplier of {(count + missing) / count:.2f}; add images of this "
                f"aspect or crop them to another")
    return PlanSummary(images=len(distinct), steps=len(plan), batch_size=batch_size, padded=padded,
                       buckets=per_bucket.most_common(), warnings=warnings)
