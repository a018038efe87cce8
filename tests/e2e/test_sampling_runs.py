"""Whole runs with samples on the tiny model (doc/SAMPLES.md): the sample files and TensorBoard images read back as a
user would see them, and sampling leaving training's random state alone."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import REPO, TINY_MODEL, read_scalars, tensorboard_images, write_json


def run_with_samples(tmp_path: Path, data_root: Path, *extra: str) -> Path:
    """A short in-process run on the tiny model at 64 px; sampling as the sample file and `extra` say."""
    import train

    logdir = tmp_path / "logs"
    status = train.main(["--resume_ckpt", str(TINY_MODEL), "--data_root", str(data_root), "--resolution", "64",
                         "--batch_size", "2", "--optimizer_config", str(REPO / "cfgs" / "tiny_optimizer.json"),
                         "--log_step", "1", "--logdir", str(logdir), "--no_save_ckpt", *extra])
    assert status == 0
    return max(logdir.iterdir(), key=lambda p: p.stat().st_mtime)


EVERY_KEY = {
    "batch_size": 2, "seed": 42, "cfgs": [7, 1.5], "scheduler": "dpm++", "num_inference_steps": 2, "resolution": 64,
    "show_progress_bars": False, "generate_pretrain_samples": True, "generate_samples_every_n_steps": 3,
    "samples": [
        {"prompt": "a red square, bright!", "negative_prompt": "blurry", "seed": 7, "size": [128, 64]},
        {"prompt": "a blue square", "seed": -1, "aspect_ratio": 2.0, "cfgs": [2, 5, 9]},
        {"random_caption": True},
    ],
}


def test_json_with_every_key_writes_the_documented_files_and_tensorboard_images(tmp_path, small_dataset):
    sample_file = write_json(tmp_path / "samples.json", EVERY_KEY)
    run = run_with_samples(tmp_path, small_dataset, "--sample_prompts", str(sample_file), "--max_epochs", "2")
    files = sorted(p.name for p in (run / "samples").iterdir())
    steps = [0, 3, 6]  # before training, then after every 3rd of the 8 steps

    assert [f for f in files if "-000-" in f] == [
        name for step in steps for name in (f"gs{step:05d}-000-a red square bright-s7.jpg",
                                            f"gs{step:05d}-000-a red square bright-s7.txt")]
    assert (run / "samples" / "gs00003-000-a red square bright-s7.txt").read_text() == (
        "a red square, bright!\nnegative prompt: blurry\nseed: 7\ncfgs: 7, 1.5\nsampler: dpm++, 2 steps\n"
        "size: 128x64\n")
    # One tile per cfg side by side: the strip is len(cfgs) requested widths wide.
    assert Image.open(run / "samples" / "gs00000-000-a red square bright-s7.jpg").size == (2 * 128, 64)

    random_seeds = []
    for step in steps:
        (jpg,) = [f for f in files if re.fullmatch(rf"gs{step:05d}-001-a blue square-s\d+\.jpg", f)]
        seed = int(jpg.rsplit("-s", 1)[1][:-4])
        assert f"seed: {seed}\n" in (run / "samples" / jpg.replace(".jpg", ".txt")).read_text()
        # aspect_ratio 2: of the 64 px bucket table (64x64, 96x64, 96x32, 128x32, ...), 96x64 is closest to 2:1;
        # one tile for each of the sample's own three cfgs.
        assert Image.open(run / "samples" / jpg).size == (3 * 96, 64)
        assert "cfgs: 2, 5, 9\n" in (run / "samples" / jpg.replace(".jpg", ".txt")).read_text()
        random_seeds.append(seed)
    assert len(set(random_seeds)) == 3  # seed -1: a fresh seed at every event

    for step in steps:
        (jpg,) = [f for f in files if f.startswith(f"gs{step:05d}-002-") and f.endswith(".jpg")]
        assert re.fullmatch(rf"gs{step:05d}-002-a (red|blue) square-s42\.jpg", jpg)  # a training caption, file seed

    images = tensorboard_images(run)
    assert images == {
        "sample_000_a red square bright": [(s, (256, 64)) for s in steps],
        "sample_001_a blue square": [(s, (288, 64)) for s in steps],
        "sample_002": [(s, (128, 64)) for s in steps],  # random captions: one tag whatever the caption
    }


def test_fixed_seeds_repeat_and_sampling_leaves_training_unchanged(tmp_path, small_dataset):
    # An ancestral sampler draws fresh noise at every step and a seed of -1 draws a seed at every event: any draw
    # from training's random state would show in the loss curve.
    sample_file = write_json(tmp_path / "samples.json", {
        "scheduler": "euler_a", "num_inference_steps": 3, "cfgs": [5], "generate_samples_every_n_steps": 2,
        "samples": [{"prompt": "a red square"}, {"random_caption": True, "seed": 3}, {"prompt": "any", "seed": -1}]})
    common = ("--sample_prompts", str(sample_file), "--max_epochs", "2", "--seed", "11", "--cond_dropout", "0.2",
              "--flip_p", "0.5")
    first = run_with_samples(tmp_path / "first", small_dataset, *common)
    second = run_with_samples(tmp_path / "second", small_dataset, *common)
    without = run_with_samples(tmp_path / "without", small_dataset, *common, "--sample_steps", "0")

    first_files = sorted(p.name for p in (first / "samples").glob("*.jpg") if "-002-any-" not in p.name)
    assert len(first_files) == 2 * 5  # steps 0, 2, 4, 6, 8
    assert first_files == sorted(p.name for p in (second / "samples").glob("*.jpg") if "-002-any-" not in p.name)
    for name in first_files:
        assert (first / "samples" / name).read_bytes() == (second / "samples" / name).read_bytes(), name
    early, late = (np.asarray(Image.open(first / "samples" / f"gs{s:05d}-000-a red square-s11.jpg")) for s in (0, 8))
    assert np.abs(early.astype(int) - late).max() > 10  # the model did change between events

    assert not list((without / "samples").iterdir())
    losses = {name: read_scalars(run)["loss/log_step"] for name, run in
              (("first", first), ("without", without))}
    assert len(losses["first"]) == 8 and losses["first"] == losses["without"]  # exactly, step by step
