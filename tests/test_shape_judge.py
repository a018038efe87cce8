"""The shapes-world judge on real images drawn by scripts/make_demo_data.py, clean and degraded as a tiny model's
samples are (blur, JPEG, low resolution, noise)."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from utils.watch.shape_judge import PALETTE, SHAPES, Judgement, _demo_data, is_correct, judge, parse_prompt

SIZES = [(128, 128)] * 8 + [(192, 128), (128, 192)]  # (width, height), as the demo data's buckets


@pytest.fixture(scope="module")
def world():
    """(colour, shape, image) for every colour and shape, one image per size of SIZES, seeded."""
    rng = random.Random(0)
    return [(colour, shape, _demo_data.render_shape(colour, shape, size, rng))
            for colour in PALETTE for shape in SHAPES for size in SIZES]


def blur(image):
    return image.filter(ImageFilter.GaussianBlur(2))


def jpeg(image):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=70)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def low_resolution(image):
    width, height = image.size
    scale = 64 / min(width, height)
    small = image.resize((round(width * scale), round(height * scale)), Image.BILINEAR)
    return small.resize(image.size, Image.BILINEAR)


def noise(image):
    pixels = np.asarray(image, dtype=np.float32)
    grain = np.random.default_rng(0).normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8))


def all_at_once(image):
    return noise(jpeg(low_resolution(blur(image))))


def accuracy(world, degrade) -> tuple[float, list]:
    wrong = [(colour, shape, judgement) for colour, shape, image in world
             if (judgement := judge(degrade(image))) != Judgement(colour, shape)]
    return 1 - len(wrong) / len(world), wrong[:5]


def test_clean_images_are_judged_right(world):
    score, wrong = accuracy(world, lambda image: image)
    assert score >= 0.99, f"accuracy {score:.1%} on {len(world)} clean images; wrong: {wrong}"


@pytest.mark.parametrize("degrade", [blur, jpeg, low_resolution, noise, all_at_once], ids=lambda f: f.__name__)
def test_degraded_images_are_judged_right(world, degrade):
    score, wrong = accuracy(world, degrade)
    assert score >= 0.95, f"accuracy {score:.1%} on {len(world)} images after {degrade.__name__}; wrong: {wrong}"


@pytest.mark.parametrize("degrade", [lambda image: image, jpeg, noise], ids=["clean", "jpeg", "noise"])
def test_plain_background_shows_nothing(degrade):
    image = degrade(Image.new("RGB", (128, 128), (120, 126, 114)))
    assert judge(image) == Judgement(None, None)
    assert is_correct(image, "a red circle") is False


def test_a_blob_or_a_bar_is_not_a_square():
    rng = np.random.default_rng(0)
    for _ in range(30):
        image = Image.new("RGB", (128, 128), (120, 120, 120))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(2, 5)):  # overlapping ovals make an irregular blob
            (x, y), (rx, ry) = rng.integers(35, 90, 2), rng.integers(8, 25, 2)
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=PALETTE["blue"])
        assert judge(blur(image)).shape != "square"
    bar = Image.new("RGB", (128, 128), (120, 120, 120))
    ImageDraw.Draw(bar).rectangle([20, 50, 110, 78], fill=PALETTE["blue"])
    assert judge(bar) == Judgement("blue", None)


@pytest.mark.parametrize("prompt, expected", [
    ("a purple circle", ("purple", "circle")),
    ("A RED cross!", ("red", "cross")),
    ("a dog", None),
    ("a red blue square", None),
    ("a red", None),
])
def test_parse_prompt(prompt, expected):
    assert parse_prompt(prompt) == expected


@pytest.mark.parametrize("prompt, expected", [
    ("a red circle", True),
    ("a blue circle", False),
    ("a red square", False),
    ("a cat", None),
])
def test_is_correct(prompt, expected):
    image = _demo_data.render_shape("red", "circle", (128, 128), random.Random(1))
    assert is_correct(image, prompt) is expected
