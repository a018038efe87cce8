"""Per-epoch batch building (REFERENCE §2.6, §2.7, §3.3, §3.4).

A plan is the list of batches of one epoch, in training order. Each batch holds indices into the
record list and never mixes buckets (so its images stack into one tensor) or batch ids.

Randomness: one `random.Random(seed + epoch)` per build, so the plan is a pure function of its
arguments — resuming at epoch N rebuilds exactly epoch N's plan, and every epoch differs (seed,
seed+1, ... as ADVANCED_TWEAKING describes; EveryDream2 starts its loader at seed+1 and draws in a
different order, so its exact sequences are not reproduced anyway, only the behaviour).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Optional, Sequence

from data.records import DEFAULT_BATCH_ID, ImageRecord

# A bucket is warned about when padding its runt batch would add more than this fraction of the
# bucket's own image count (REFERENCE §3.3, start-up warning).
RUNT_WARNING_FRACTION = 0.5

Bucket = tuple[int, int]


@dataclass(frozen=True)
class Batch:
    indices: tuple[int, ...]   # into the record list; may repeat (multiply, runt padding)
    bucket: Bucket             # (width, height) shared by every image of the batch
    runt_size: int = 0         # r > 0: the planned batch's first r slots are real, the rest duplicates
    batch_id: str = DEFAULT_BATCH_ID
    # One process's share of a planned batch (`process_share`) holds slots first_slot, first_slot+1,
    # ... of it; runt_size still counts the planned batch's slots, so every process weighs its loss
    # the same.
    first_slot: int = 0


@dataclass(frozen=True)
class RatedDataset:
    """rated_dataset (§2.7): later epochs train a rating-weighted subset of the images."""

    max_epochs: int
    target_dropout_percent: float

    def fraction(self, epoch: int) -> float:
        """Share of the images epoch `epoch` (0-based) trains. Epoch 0 always trains the full set;
        epoch e+1 keeps (max_epochs - e * (1 - pct/100)) / max_epochs, as EveryDream2, so with
        many epochs the last one keeps close to pct percent."""
        if epoch == 0:
            return 1.0
        keep = 1 - self.target_dropout_percent / 100
        return (self.max_epochs - (epoch - 1) * keep) / self.max_epochs


def epoch_items(records: Sequence[ImageRecord], seed: int, epoch: int, rng: random.Random,
                rated: Optional[RatedDataset] = None) -> list[int]:
    """The record indices trained this epoch, repeats included (unshuffled).

    The base order is the records shuffled once with Random(seed), then stably sorted by rating,
    highest first: the same every epoch, so fractional picks favour nothing but rating.
    - multiply (§2.6): floor(m) copies of each image; then sweeps over the base order take each
      image with probability frac(m) until the epoch holds floor(sum of m) items.
    - rated_dataset (§2.7), when its fraction for this epoch is below 1: ceil(N x fraction) distinct
      images drawn without replacement with probability proportional to rating (multiply ignored).
    """
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -records[i].rating)
    fraction = rated.fraction(epoch) if rated else 1.0
    if fraction < 1:
        keep = math.ceil(len(records) * fraction)
        # Efraimidis-Spirakis: the `keep` largest u^(1/w) are a weighted sample without replacement.
        keyed = sorted(order, key=lambda i: rng.random() ** (1 / records[i].rating), reverse=True)
        return keyed[:keep]
    items = [i for i in order for _ in range(int(records[i].multiply))]
    # Rounded so that three images of multiply 1/3 make one item, not 0.999... -> 0.
    target = math.floor(round(math.fsum(r.multiply for r in records), 9))
    fractional = [(i, records[i].multiply % 1) for i in order if records[i].multiply % 1]
    while len(items) < target and fractional:
        for i, p in fractional:
            if rng.random() < p:
                items.append(i)
                if len(items) == target:
                    break
    return items


def build_epoch_batches(records: Sequence[ImageRecord], batch_size: int, seed: int, epoch: int,
                        grad_accum: int = 1, rated: Optional[RatedDataset] = None) -> list[Batch]:
    """The epoch's batches in training order (§3.3).

    1. Pick the epoch's items (`epoch_items`) and shuffle them.
    2. Group them by (batch_id, bucket), in order of first appearance.
    3. A named batch_id group whose size is not a multiple of batch_size gives its surplus (its last
       size mod batch_size items) to the default_batch group of the same bucket.
    4. Cut each group into batch_size chunks. A group still not a multiple of batch_size ends in a
       runt: its last r items plus random duplicates of those r items up to batch_size, every slot
       tagged runt_size=r (the loss is later scaled by (r/batch_size)^1.5). Nothing is dropped.
    5. Shuffle the chunks of each batch_id; pack them into groups of grad_accum chunks so that one
       optimizer update sees one batch_id where possible (`_pack`).
    6. Shuffle the groups; an incomplete group (fewer than grad_accum chunks) stays last, so the
       training loop's epoch-aligned accumulation windows match the groups.
    """
    if batch_size < 1 or grad_accum < 1:
        raise ValueError(f"batch_size and grad_accum must be at least 1, got {batch_size}, "
                         f"{grad_accum}")
    rng = random.Random(seed + epoch)
    items = epoch_items(records, seed, epoch, rng, rated)
    rng.shuffle(items)

    groups: dict[tuple[str, Bucket], list[int]] = {}
    for i in items:
        rec = records[i]
        if rec.bucket is None:
            raise ValueError(f"{rec.path}: no bucket assigned (call assign_buckets first)")
        groups.setdefault((rec.batch_id, rec.bucket), []).append(i)
    for (batch_id, bucket), members in list(groups.items()):
        surplus = len(members) % batch_size
        if batch_id != DEFAULT_BATCH_ID and surplus:
            groups[(batch_id, bucket)] = members[:-surplus]
            groups.setdefault((DEFAULT_BATCH_ID, bucket), []).extend(members[-surplus:])

    chunks: dict[str, list[Batch]] = {}
    for (batch_id, bucket), members in groups.items():
        full = len(members) - len(members) % batch_size
        out = chunks.setdefault(batch_id, [])
        for start in range(0, full, batch_size):
            out.append(Batch(tuple(members[start:start + batch_size]), bucket, 0, batch_id))
        runt = members[full:]
        if runt:
            padding = [rng.choice(runt) for _ in range(batch_size - len(runt))]
            out.append(Batch(tuple(runt + padding), bucket, len(runt), batch_id))
    for batch_id in chunks:
        rng.shuffle(chunks[batch_id])

    packed = _pack(chunks, grad_accum)
    complete = [g for g in packed if len(g) == grad_accum]
    incomplete = [g for g in packed if len(g) < grad_accum]
    rng.shuffle(complete)
    return [batch for group in complete + incomplete for batch in group]


def _pack(chunks: dict[str, list[Batch]], grad_accum: int) -> list[list[Batch]]:
    """Groups of grad_accum chunks (§3.3 step 7); all complete except at most the last one.

    Named batch_ids fill whole groups with their own chunks first. Their leftovers (fewer than
    grad_accum chunks each) are packed first-fit-decreasing, largest first, into shared groups;
    gaps are filled with default_batch chunks, and when those run out the unfilled groups are
    merged, splitting a named batch_id's leftover over two updates. Remaining default chunks
    follow."""
    default = list(chunks.get(DEFAULT_BATCH_ID, []))
    named = sorted((c for bid, c in chunks.items() if bid != DEFAULT_BATCH_ID), key=len,
                   reverse=True)
    groups: list[list[Batch]] = []
    leftovers = []
    for run in named:
        whole = len(run) - len(run) % grad_accum
        groups += [run[i:i + grad_accum] for i in range(0, whole, grad_accum)]
        if whole < len(run):
            leftovers.append(run[whole:])
    bins: list[list[Batch]] = []
    for run in sorted(leftovers, key=len, reverse=True):
        target = next((b for b in bins if len(b) + len(run) <= grad_accum), None)
        if target is None:
            bins.append(list(run))
        else:
            target.extend(run)
    for b in bins:
        while len(b) < grad_accum and default:
            b.append(default.pop())
    groups += [b for b in bins if len(b) == grad_accum]
    loose = [chunk for b in bins if len(b) < grad_accum for chunk in b]
    groups += [loose[i:i + grad_accum] for i in range(0, len(loose), grad_accum)]
    groups += [default[i:i + grad_accum] for i in range(0, len(default), grad_accum)]
    return groups


def process_share(plan: Sequence[Batch], rank: int, processes: int) -> list[Batch]:
    """Process `rank`'s part of every batch of a plan built for all `processes` together, i.e. with
    batch size = per-process batch size x processes: of a batch of B slots, slots
    [rank x B/processes, (rank + 1) x B/processes).

    So at every step every process trains images of the same bucket and batch_id; over an epoch the
    processes together train each planned slot once; and the images, their order and (through the
    slot number kept in `first_slot`) their per-sample randomness are those of one process training
    the whole plan, whatever the number of processes."""
    if not 0 <= rank < processes:
        raise ValueError(f"rank {rank} is not one of {processes} processes")
    share = []
    for batch in plan:
        size, leftover = divmod(len(batch.indices), processes)
        if leftover:
            raise ValueError(f"a batch of {len(batch.indices)} images cannot be split evenly over "
                             f"{processes} processes; plan with a multiple of {processes}")
        share.append(replace(batch, indices=batch.indices[rank * size:(rank + 1) * size],
                             first_slot=batch.first_slot + rank * size))
    return share


@dataclass
class PlanSummary:
    """Numbers for the start-up summary of an epoch plan."""

    images: int                    # distinct images in the plan
    samples: int                   # real slots: images with multiply repeats, without padding
    steps: int                     # batches = micro-steps per epoch
    batch_size: int
    padded: int                    # slots filled with duplicates to complete runt batches
    # images per (batch_id, (w, h)), largest first
    buckets: list[tuple[tuple[str, Bucket], int]] = field(default_factory=list)
    # (batch_id, bucket, moved, group size): named items trained in default_batch batches
    demoted: list[tuple[str, Bucket, int, int]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        repeats = "" if self.samples == self.images else \
            f" ({self.samples} samples per epoch with multiply repeats)"
        out = [f"{self.images} images{repeats}, {self.steps} steps per epoch at batch size "
               f"{self.batch_size}; {self.padded} slot(s) filled with duplicates to complete "
               f"buckets whose count is not a multiple of the batch size; no image dropped"]
        for (batch_id, (w, h)), count in self.buckets:
            label = "" if batch_id == DEFAULT_BATCH_ID else f" [{batch_id}]"
            out.append(f"  bucket {w}x{h}{label}: {count} sample{'' if count == 1 else 's'}")
        for batch_id, (w, h), moved, size in self.demoted:
            out.append(f"  batch_id '{batch_id}' has {size} samples in bucket {w}x{h}, not a "
                       f"multiple of batch size {self.batch_size}: {moved} of them train in "
                       f"default_batch batches")
        return out + self.warnings


def epoch_plan_summary(plan: Sequence[Batch], batch_size: int,
                       records: Optional[Sequence[ImageRecord]] = None) -> PlanSummary:
    """Summarise a plan: image, sample and step counts, per-bucket counts, runt padding, the §3.3
    warning for buckets where padding adds more than half again of their samples (those images are
    effectively trained that much more often) and, given the records, the named batch_id samples
    moved to default_batch batches."""
    per_bucket: Counter = Counter()
    named: Counter = Counter()
    moved: Counter = Counter()
    distinct: set[int] = set()
    padded = samples = 0
    for batch in plan:
        real = batch.indices[:batch.runt_size] if batch.runt_size else batch.indices
        per_bucket[(batch.batch_id, batch.bucket)] += len(real)
        distinct.update(real)
        samples += len(real)
        padded += len(batch.indices) - len(real)
        for i in real if records is not None else ():
            own = records[i].batch_id
            if own != DEFAULT_BATCH_ID:
                named[(own, batch.bucket)] += 1
                moved[(own, batch.bucket)] += own != batch.batch_id
    demoted = [(bid, bucket, n, named[(bid, bucket)]) for (bid, bucket), n in moved.items() if n]

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
    return PlanSummary(images=len(distinct), samples=samples, steps=len(plan),
                       batch_size=batch_size, padded=padded, buckets=per_bucket.most_common(),
                       demoted=demoted, warnings=warnings)
