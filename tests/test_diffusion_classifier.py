"""The diffusion classifier (utils/watch/diffusion_classifier.py, scripts/evaluate.py) on the tiny models: the
demo's base model, pretrained on the shapes world, and the untrained one, scoring freshly drawn held-out squares."""
from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.make_demo_data import render_shape
from tests.conftest import REPO, TINY_MODEL
from utils.model import models
from utils.objective import flow
from utils.watch.diffusion_classifier import classify, draws, embed_captions, evaluate, image_latent, read_held_out

RESOLUTION = 128  # the tiny model's training size
CAPTIONS = ("a red square", "a blue square")
HELD_OUT = 16
TRIALS = 16


def draw_squares(folder: Path, count: int, seed: int) -> Path:
    """`count` pictures of the shapes world, each a red or a blue square (in turn) of its own size, place, shade and
    background, captioned."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        colour = ("red", "blue")[i % 2]
        render_shape(colour, "square", (RESOLUTION, RESOLUTION), rng).save(folder / f"{colour}_{i:02d}.png")
        (folder / f"{colour}_{i:02d}.txt").write_text(f"a {colour} square")
    return folder


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    return draw_squares(tmp_path_factory.mktemp("held_out") / "images", HELD_OUT, seed=1)


@pytest.fixture(scope="module")
def trained_model() -> Path:
    """demo/tiny-shapes: the tiny model pretrained on the shapes world, red and blue squares among them."""
    return REPO / "demo" / "tiny-shapes"


def test_a_model_trained_on_the_captions_tells_them_apart_and_the_untrained_one_does_not(trained_model, held_out):
    trained = evaluate(models.load(trained_model), held_out, trials=TRIALS, resolution=RESOLUTION)
    untrained = evaluate(models.load(TINY_MODEL), held_out, trials=TRIALS, resolution=RESOLUTION)
    assert trained.accuracy >= 0.9, trained.table()
    assert untrained.accuracy <= 0.75, untrained.table()
    assert trained.candidates == sorted(CAPTIONS) and trained.chance == 0.5
    assert {caption: images for caption, (images, _) in trained.per_caption().items()} == \
        {caption: HELD_OUT // 2 for caption in CAPTIONS}
    assert sum(map(sum, trained.confusion)) == HELD_OUT
    assert sum(trained.confusion[i][i] for i in range(2)) == round(trained.accuracy * HELD_OUT)


@pytest.fixture(scope="module")
def two_latents(held_out):
    model = models.load(TINY_MODEL)
    return model, [image_latent(model.vae, record, seed=0) for record in read_held_out(held_out, RESOLUTION).records[:2]]


def test_the_same_seed_gives_the_same_losses(two_latents):
    model, latents = two_latents
    first, again = (classify(model, latents, CAPTIONS, trials=4, seed=3).losses for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, classify(model, latents, CAPTIONS, trials=4, seed=4).losses)


def test_every_caption_is_scored_with_the_same_timesteps_and_noise(two_latents):
    """A caption given twice gets exactly the same losses: nothing but the caption differs between candidates."""
    model, latents = two_latents
    losses = classify(model, latents, [*CAPTIONS, CAPTIONS[0]], trials=4, batch_size=4).losses
    assert torch.equal(losses[:, 0], losses[:, 2])
    assert not torch.equal(losses[:, 0], losses[:, 1])


def test_a_rectified_flow_model_is_scored_against_its_velocity(two_latents):
    """On the straight path: the UNet sees (1 - sigma) x + sigma noise at timestep sigma x 1000 and should predict
    noise - x (utils/objective/flow.py's convention)."""
    model, (latent, _) = two_latents
    flow_model = dataclasses.replace(model, scheduler=flow.flow_scheduler(model.scheduler.config))
    loss = classify(flow_model, [latent], CAPTIONS[:1], trials=2, seed=5).losses[0, 0]
    timesteps, noise = draws(torch.Generator().manual_seed(5), latent.shape, 2, 1000)
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = model.unet((1 - sigma) * latent + sigma * noise, timesteps,
                          embed_captions(model, CAPTIONS[:1], 0).expand(2, -1, -1)).sample
    assert loss.item() == pytest.approx((pred - (noise - latent)).pow(2).mean().item(), rel=1e-5)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/evaluate.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_the_script_stops_at_a_missing_data_folder_naming_it(tmp_path):
    missing = tmp_path / "no_such_folder"
    result = run_script("--model", str(TINY_MODEL), "--data_root", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_script_prints_each_captions_accuracy_and_the_overall_accuracy(trained_model, held_out):
    result = run_script("--model", str(trained_model), "--data_root", str(held_out), "--resolution", str(RESOLUTION),
                        "--trials", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith(CAPTIONS[0]) for line in lines) and any(line.startswith(CAPTIONS[1]) for line in lines)
    assert any(line.startswith("overall accuracy: ") and f"of {HELD_OUT} images" in line for line in lines)
