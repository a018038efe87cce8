"""Data-parallel training over several processes (issue #10), on CPU with the gloo backend.

The unit tests split real epoch plans and real loader batches between processes without starting any; the
end-to-end tests launch train.py under torchrun with two processes and compare it with one process training
the same global batch.
"""
from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest
import torch

import data
from data.batching import process_share
from data.records import DEFAULT_BATCH_ID, Caption, ImageRecord
from tests.conftest import TINY_MODEL

BUCKETS = [(512, 512), (576, 448), (448, 576)]


def record(i: int, bucket, **kw) -> ImageRecord:
    return ImageRecord(path=f"/data/img{i}.jpg", caption=Caption(f"img{i}"), width=bucket[0], height=bucket[1],
                       bucket=bucket, **kw)


def mixed_records() -> list[ImageRecord]:
    """Three buckets, two named batch groups (one not a multiple of any batch size), repeats and a fraction."""
    return ([record(i, BUCKETS[0]) for i in range(9)]
            + [record(i, BUCKETS[1], batch_id="horses") for i in range(9, 14)]
            + [record(i, BUCKETS[2], multiply=2.0) for i in range(14, 17)]
            + [record(i, BUCKETS[0], batch_id="cats", multiply=1.5) for i in range(17, 21)]
            + [record(21, BUCKETS[2])])


def real_slots(share: list[data.Batch]) -> list[int]:
    """The record indices a process trains that are not runt padding (slots below the planned runt size)."""
    return [i for batch in share for slot, i in enumerate(batch.indices, start=batch.first_slot)
            if not batch.runt_size or slot < batch.runt_size]


@pytest.mark.parametrize("per_process, processes, grad_accum", [(2, 2, 1), (1, 4, 3), (3, 2, 2)])
def test_process_shares_cover_each_planned_image_once_with_one_bucket_and_batch_id_per_step(
        per_process, processes, grad_accum):
    records = mixed_records()
    for epoch in range(3):
        plan = data.build_epoch_batches(records, per_process * processes, seed=11, epoch=epoch, grad_accum=grad_accum)
        shares = [process_share(plan, rank, processes) for rank in range(processes)]
        assert all(len(share) == len(plan) for share in shares)
        for step, planned in enumerate(plan):
            parts = [share[step] for share in shares]
            assert all(len(p.indices) == per_process for p in parts)
            # Whole batches of one bucket and one batch group on every process, the runt counted as planned.
            assert {(p.bucket, p.batch_id, p.runt_size) for p in parts} == \
                {(planned.bucket, planned.batch_id, planned.runt_size)}
            assert {records[i].bucket for p in parts for i in p.indices} == {planned.bucket}
            if planned.batch_id != DEFAULT_BATCH_ID:
                assert {records[i].batch_id for p in parts for i in p.indices} == {planned.batch_id}
            # Rank r holds slots [r x b, (r + 1) x b): together, the planned batch in order.
            assert [p.first_slot for p in parts] == [rank * per_process for rank in range(processes)]
            assert sum((p.indices for p in parts), ()) == planned.indices
        # Each image once per epoch over all processes, repeated as multiply says (the 4 "cats" of multiply
        # 1.5: 6 times between them, each at least once).
        trained = Counter(i for share in shares for i in real_slots(share))
        assert trained == Counter(data.epoch_items(records, 11, epoch, random.Random(11 + epoch)))
        assert all(trained[i] == 1 for i in [*range(14), 21]) and all(trained[i] == 2 for i in range(14, 17))
        assert all(trained[i] >= 1 for i in range(17, 21)) and sum(trained[i] for i in range(17, 21)) == 6


def test_one_process_trains_the_plan_itself_and_an_uneven_split_is_refused():
    plan = data.build_epoch_batches(mixed_records(), 4, seed=3, epoch=0)
    assert process_share(plan, 0, 1) == plan
    with pytest.raises(ValueError, match="cannot be split evenly over 3 processes"):
        process_share(plan, 0, 3)
    with pytest.raises(ValueError, match="rank 2 is not one of 2"):
        process_share(plan, 2, 2)


@pytest.fixture(scope="module")
def tiny():
    from utils import models

    model = models.load(TINY_MODEL)
    return model, model.noise_scheduler("ddpm")


def test_process_loaders_yield_the_rows_of_the_one_process_batch(small_dataset, tiny):
    """Crop, flip, tag order and caption dropout are drawn per planned slot, so two processes' batches stacked
    are the batch one process loads for the whole plan."""
    model, _ = tiny
    (small_dataset / "img_3.txt").write_text("a red square, shiny, small, centred, bright")
    records = data.assign_buckets(data.scan(small_dataset).records, 128)
    plan = data.build_epoch_batches(records, 4, seed=5, epoch=1)
    options = dict(cond_dropout=0.3, seed=5, epoch=1, flip_p=0.5, shuffle_tags=True)
    whole = list(data.make_epoch_loader(plan, records, model.tokenizer, **options))
    halves = [list(data.make_epoch_loader(process_share(plan, rank, 2), records, model.tokenizer, **options))
              for rank in range(2)]
    for step, batch in enumerate(whole):
        first, second = halves[0][step], halves[1][step]
        assert torch.equal(torch.cat([first["pixel_values"], second["pixel_values"]]), batch["pixel_values"])
        assert first["captions"] + second["captions"] == batch["captions"]
        assert first["runt_size"] == second["runt_size"] == batch["runt_size"]
    # Numbering the second process's slots from 0 instead would draw other captions: the check above has teeth.
    renumbered = [dataclasses.replace(b, first_slot=0) for b in process_share(plan, 1, 2)]
    assert [b["captions"] for b in data.make_epoch_loader(renumbered, records, model.tokenizer, **options)] != \
        [b["captions"] for b in halves[1]]


@pytest.mark.parametrize("runt_size, rectified_flow", [(0, False), (3, True)])
def test_process_losses_average_to_the_loss_of_the_global_batch(tiny, runt_size, rectified_flow):
    """Every random draw of the step (VAE sample, embedding perturbation, offset and pyramid noise, timesteps) is
    made for the global batch and sliced, and a runt is weighed by the global batch size: the mean of two
    processes' losses, and of their gradients (what DDP averages), equals one process's on the whole batch."""
    from types import SimpleNamespace

    from utils.step import BatchShare, StepSettings, compute_loss

    model, scheduler = tiny
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(4, 3, 64, 64, generator=generator) * 2 - 1,
             "input_ids": model.tokenizer(["a red circle", "a blue square", "a green triangle", "a red circle"],
                                          padding="max_length", max_length=77, return_tensors="pt").input_ids,
             "loss_scale": torch.tensor([1.0, 0.5, 2.0, 1.0]), "runt_size": runt_size}
    options = dict(loss_type="mse", zero_frequency_noise_ratio=0.1, timestep_start=0, timestep_end=1000,
                   pyramid_noise_discount=0.3, embedding_perturbation=0.5, min_snr_gamma=5.0, clip_skip=0,
                   rectified_flow=rectified_flow)

    def loss_and_grads(rows: slice, batch_size: int, share: BatchShare):
        part = {key: value[rows] if torch.is_tensor(value) else value for key, value in batch.items()}
        model.unet.zero_grad()
        torch.manual_seed(7)
        loss = compute_loss(model.unet, model.text_encoder, model.vae, scheduler, part,
                            StepSettings.from_args(SimpleNamespace(batch_size=batch_size, **options)), share)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.unet.parameters()]

    whole_loss, whole_grads = loss_and_grads(slice(0, 4), 4, BatchShare())
    (loss_0, grads_0), (loss_1, grads_1) = (loss_and_grads(slice(2 * r, 2 * r + 2), 2, BatchShare(r, 2))
                                            for r in range(2))
    torch.testing.assert_close((loss_0 + loss_1) / 2, whole_loss, rtol=1e-5, atol=0)
    for whole, g0, g1 in zip(whole_grads, grads_0, grads_1):
        torch.testing.assert_close((g0 + g1) / 2, whole, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(loss_0, loss_1)  # the halves really differ: the test compares different rows
    model.unet.zero_grad(set_to_none=True)


def test_batch_share_slices_what_one_process_draws():
    from utils.step import BatchShare

    torch.manual_seed(3)
    whole = torch.randn(6, 2)
    torch.manual_seed(3)
    share = BatchShare(rank=1, processes=3)
    mine = share.mine(torch.randn(share.whole(torch.empty(2, 2)).shape))
    assert torch.equal(mine, whole[2:4])
