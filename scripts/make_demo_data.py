#!/usr/bin/env python
"""Generate the small captioned demo image set (four shape concepts, drawn with PIL).

Each concept ("a red circle", "a blue square", "a green triangle", "a yellow cross")
gets ``n_square`` 128x128 images plus one 192x128 (landscape) and one 128x192 (portrait)
image, so aspect-ratio buckets show up.  Shapes have random position, size and a random
muted background colour.  Every image ``NAME.png`` has a caption sidecar ``NAME.txt``.
Output is deterministic for a given seed.

    python scripts/make_demo_data.py --out demo/data [--seed 0] [--n_square 8]

Importable: ``render_image(concept, size, rng)``, ``render_dataset(seed, ...)`` (in memory)
and ``make_demo_data(out_dir, seed, ...)``.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

# name -> (caption, base RGB colour of the shape)
CONCEPTS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "red_circle": ("a red circle", (220, 30, 30)),
    "blue_square": ("a blue square", (30, 60, 220)),
    "green_triangle": ("a green triangle", (30, 180, 40)),
    "yellow_cross": ("a yellow cross", (240, 210, 20)),
}

SQUARE = (128, 128)
LANDSCAPE = (192, 128)  # (width, height)
PORTRAIT = (128, 192)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 20) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _background(rng: random.Random) -> tuple[int, int, int]:
    """A muted (low-saturation) colour, dark or light, that never looks like a shape colour."""
    grey = rng.randint(40, 215)
    return tuple(max(0, min(255, grey + rng.randint(-18, 18))) for _ in range(3))


# The shapes world: every colour of PALETTE with every shape of SHAPES, captioned "a <colour> <shape>".
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "blue": (30, 60, 220),
    "green": (30, 180, 40),
    "yellow": (240, 210, 20),
    "purple": (200, 40, 220),
}
SHAPES = ("circle", "square", "triangle", "cross")


def render_shape(colour: str, shape: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """Draw a ``colour`` ``shape`` (names from PALETTE and SHAPES) at ``size`` = (width, height) on a muted
    background, with random position, extent and colour jitter from ``rng``."""
    w, h = size
    img = Image.new("RGB", size, _background(rng))
    draw = ImageDraw.Draw(img)
    color = _jitter(PALETTE[colour], rng)
    s = rng.randint(int(0.3 * min(w, h)), int(0.6 * min(w, h)))  # shape extent in px
    x0 = rng.randint(4, w - s - 4)
    y0 = rng.randint(4, h - s - 4)
    x1, y1 = x0 + s, y0 + s
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=color)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=color)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "cross":
        t = max(4, s // 4)  # bar thickness
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle([x0, cy - t // 2, x1, cy + t // 2], fill=color)
        draw.rectangle([cx - t // 2, y0, cx + t // 2, y1], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")
    return img


def render_image(concept: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """Draw one image of ``concept`` (a key of CONCEPTS) at ``size`` = (width, height) with randomness from ``rng``."""
    colour, shape = concept.split("_")
    return render_shape(colour, shape, size, rng)


def render_dataset(seed: int = 0, n_square: int = 8, n_landscape: int = 1, n_portrait: int = 1):
    """Return a list of (file stem, caption, PIL image), deterministic for ``seed``."""
    rng = random.Random(seed)
    items = []
    for concept, (caption, _) in CONCEPTS.items():
        sizes = [SQUARE] * n_square + [LANDSCAPE] * n_landscape + [PORTRAIT] * n_portrait
        for i, size in enumerate(sizes):
            items.append((f"{concept}_{i:02d}", caption, render_image(concept, size, rng)))
    return items


NEW_COLOUR = "purple"  # what the demo teaches: demo/tiny-shapes never saw it (scripts/pretrain_tiny_shapes.py)


def render_finetune_dataset(seed: int = 0, n_new: int = 8, n_known: int = 2):
    """The demo's fine-tuning set (demo/purple): ``n_new`` images of each shape in NEW_COLOUR, and ``n_known`` of
    every known colour and shape, so the known concepts stay in view while the new one is learned. A list of
    (file stem, caption, PIL image), 128x128, deterministic for ``seed``."""
    rng = random.Random(seed)
    items = []
    for colour in PALETTE:
        for shape in SHAPES:
            for i in range(n_new if colour == NEW_COLOUR else n_known):
                items.append((f"{colour}_{shape}_{i:02d}", f"a {colour} {shape}", render_shape(colour, shape, SQUARE, rng)))
    return items


def make_demo_data(out_dir: str | Path, seed: int = 0, n_square: int = 8, n_landscape: int = 1, n_portrait: int = 1,
                   finetune: bool = False):
    """Write ``NAME.png`` + ``NAME.txt`` pairs to ``out_dir`` (the fine-tuning set with ``finetune``); returns the
    list of png paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    items = render_finetune_dataset(seed) if finetune else render_dataset(seed, n_square, n_landscape, n_portrait)
    for stem, caption, img in items:
        img.save(out / f"{stem}.png", optimize=True)
        (out / f"{stem}.txt").write_text(caption + "\n")
        paths.append(out / f"{stem}.png")
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description="Generate the captioned shape demo data set.")
    p.add_argument("--out", default="demo/data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_square", type=int, default=8, help="128x128 images per concept")
    p.add_argument("--n_landscape", type=int, default=1, help="192x128 images per concept")
    p.add_argument("--n_portrait", type=int, default=1, help="128x192 images per concept")
    p.add_argument("--finetune", action="store_true", help=f"the demo's fine-tuning set instead (demo/purple): "
                   f"8 {NEW_COLOUR} images of each shape and 2 of each known concept")
    a = p.parse_args()
    paths = make_demo_data(a.out, a.seed, a.n_square, a.n_landscape, a.n_portrait, a.finetune)
    print(f"wrote {len(paths)} images (+ .txt captions) to {a.out}")


if __name__ == "__main__":
    main()
