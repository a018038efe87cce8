"""Exact resume: the pieces of training state, and train.py runs interrupted and resumed."""
from __future__ import annotations

import random

import numpy as np
import torch

import data
from tests.conftest import TINY_MODEL
from utils import resume


def test_random_generators_round_trip_through_the_state_file(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    torch.randn(5), random.random(), np.random.rand()
    state = resume.TrainingState(epoch=1, step_in_epoch=2, global_step=3, fingerprint={}, rng=resume.capture_rng())
    expected = (torch.randn(7), random.random(), np.random.rand(3), np.random.randn())
    resume.save(state, tmp_path)
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    loaded = resume.load(tmp_path)  # weights_only: nothing but plain data in the file
    assert (loaded.epoch, loaded.step_in_epoch, loaded.global_step) == (1, 2, 3)
    resume.restore_rng(loaded.rng)
    again = (torch.randn(7), random.random(), np.random.rand(3), np.random.randn())
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1]
    assert np.array_equal(expected[2], again[2]) and expected[3] == again[3]
    assert resume.load(tmp_path / "nothing-here") is None


def test_pending_gradients_are_restored_exactly():
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    grads = resume.pending_gradients({"unet": model})
    other = torch.nn.Linear(3, 2)
    resume.restore_gradients({"unet": other}, grads)
    assert torch.equal(other.weight.grad, model.weight.grad) and torch.equal(other.bias.grad, model.bias.grad)


def test_fingerprint_names_what_changed(small_dataset):
    from types import SimpleNamespace

    records = data.assign_buckets(data.scan(small_dataset).records, 128)
    args = SimpleNamespace(batch_size=2, grad_accum=1, seed=5, resolution=128)
    saved = resume.fingerprint(args, records, 1)
    assert resume.differences(saved, resume.fingerprint(args, records, 1)) == []
    (small_dataset / "img_0.txt").write_text("a green square")
    changed = data.assign_buckets(data.scan(small_dataset).records, 128)
    args.batch_size = 4
    assert resume.differences(saved, resume.fingerprint(args, changed, 2)) == [
        "batch_size: 2 then, 4 now", "num_processes: 1 then, 2 now",
        "the training data (images, captions or their settings) changed"]


def test_a_loader_started_mid_epoch_yields_the_same_later_batches(small_dataset):
    from utils.models import load

    tokenizer = load(TINY_MODEL).tokenizer
    records = data.assign_buckets(data.scan(small_dataset).records, 128)
    plan = data.build_epoch_batches(records, 2, seed=3, epoch=1)
    options = dict(cond_dropout=0.5, seed=3, epoch=1, flip_p=0.5, shuffle_tags=True)
    full = list(data.make_epoch_loader(plan, records, tokenizer, **options))
    late = list(data.make_epoch_loader(plan, records, tokenizer, **options, start_step=2))
    assert len(late) == len(full) - 2
    for a, b in zip(full[2:], late):
        assert a["captions"] == b["captions"] and torch.equal(a["pixel_values"], b["pixel_values"])
