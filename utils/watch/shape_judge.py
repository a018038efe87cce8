"""A pixel judge for the demo's shapes world: does a generated image show what its prompt asks for?

Used to score demo samples against their prompts (doc/EVALUATION.md): `is_correct(image, "a red circle")` says
whether the image shows one red circle. The world is the one scripts/make_demo_data.py draws: one flat shape of a
PALETTE colour, one of SHAPES, on a muted, nearly grey background.

How an image is read:
- the background colour is the median of the image border; the shape is the largest connected region of pixels
  far from it, cut at half the shape's own contrast so that blur moves no edge;
- the colour is the palette colour nearest in hue to the region's median colour;
- the shape is the best match of the region, stretched to a fixed grid, against the world's own shapes drawn by
  `render_shape` and read the same way; a poor best match (a blob) is no shape.

Images from a tiny diffusion model are blurry and noisy: the thresholds leave room for blur, JPEG artefacts, noise
and a soft outline.
"""
from __future__ import annotations

import colorsys
import functools
import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def _load_demo_data():
    """scripts/make_demo_data.py, which defines the world, loaded without needing scripts/ to be a package."""
    path = Path(__file__).resolve().parents[2] / "scripts" / "make_demo_data.py"
    spec = importlib.util.spec_from_file_location("_make_demo_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_demo_data = _load_demo_data()
PALETTE: dict[str, tuple[int, int, int]] = _demo_data.PALETTE
SHAPES: tuple[str, ...] = _demo_data.SHAPES

BORDER = 2  # px of each edge that estimate the background; the world keeps shapes 4 px from the edges
MIN_DISTANCE = 60.0  # RGB distance that is surely not background: the world's background is one flat colour
MIN_AREA = 0.01  # fraction of the image; the smallest shape of the world covers about 4%
MIN_SATURATION = 0.3  # below it the shape is greyish and has no palette colour; palette colours are above 0.7
MAX_HUE_DISTANCE = 40.0  # degrees from the nearest palette hue; neighbouring palette hues are about 50 apart
MAX_ASPECT = 1.5  # every shape of the world is as wide as it is tall; a long bar is not a square
GRID = 32  # side of the grid regions are compared on
MIN_MATCH = 0.7  # intersection over union with the best shape: blurred small shapes score 0.75+, most blobs less


@dataclass(frozen=True)
class Judgement:
    """What an image shows: a palette colour and a shape of the world, each None when there is none or it is unclear."""

    colour: str | None
    shape: str | None


def parse_prompt(prompt: str) -> tuple[str, str] | None:
    """(colour, shape) when the prompt names exactly one palette colour and one shape, else None."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    colours, shapes = words & PALETTE.keys(), words & set(SHAPES)
    if len(colours) != 1 or len(shapes) != 1:
        return None
    return colours.pop(), shapes.pop()


def judge(image: Image.Image) -> Judgement:
    """Read the colour and shape an image shows."""
    pixels = _smoothed_pixels(image)
    region = _shape_region(pixels)
    if region is None:
        return Judgement(None, None)
    return Judgement(_colour_name(np.median(pixels[region], axis=0)), _shape_name(region))


def is_correct(image: Image.Image, prompt: str) -> bool | None:
    """Whether the image shows the colour and shape the prompt asks for; None when the prompt is not of this world."""
    wanted = parse_prompt(prompt)
    if wanted is None:
        return None
    return judge(image) == Judgement(*wanted)


def _smoothed_pixels(image: Image.Image) -> np.ndarray:
    """(H, W, 3) float RGB, averaged over 3x3 pixels so that noise and JPEG blocks do not break the shape apart."""
    return np.asarray(image.convert("RGB").filter(ImageFilter.BoxBlur(1)), dtype=np.float32)


def _shape_region(pixels: np.ndarray) -> np.ndarray | None:
    """Boolean mask of the shape in an (H, W, 3) image, or None when there is no shape."""
    distance = np.linalg.norm(pixels - _background(pixels), axis=2)
    rough = _largest_component(distance > MIN_DISTANCE)
    if rough.sum() < MIN_AREA * rough.size:
        return None
    # Half the contrast keeps a blurred edge where it was; a fixed cut would shrink faint shapes and grow strong ones.
    contrast = np.median(distance[rough])
    return _largest_component(distance > contrast / 2)


def _background(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([
        pixels[:BORDER].reshape(-1, 3), pixels[-BORDER:].reshape(-1, 3),
        pixels[:, :BORDER].reshape(-1, 3), pixels[:, -BORDER:].reshape(-1, 3),
    ])
    return np.median(border, axis=0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (all False when the mask is empty).

    Works on runs of True along each row, joined where runs of neighbouring rows overlap, which is fast in plain
    Python because a shape has a run or two per row."""
    rows, starts, ends = _row_runs(mask)
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_run_of_row = np.searchsorted(rows, np.arange(mask.shape[0] + 1)).tolist()
    for row in range(1, mask.shape[0]):
        i, i_end = first_run_of_row[row - 1], first_run_of_row[row]
        j, j_end = i_end, first_run_of_row[row + 1]
        while i < i_end and j < j_end:
            if starts[i] < ends[j] and starts[j] < ends[i]:
                parent[root(i)] = root(j)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1

    largest = np.zeros_like(mask)
    if not parent:
        return largest
    roots = np.array([root(i) for i in range(len(parent))])
    keep = roots == np.bincount(roots, weights=np.subtract(ends, starts)).argmax()
    for row, start, end in zip(rows[keep], np.asarray(starts)[keep], np.asarray(ends)[keep]):
        largest[row, start:end] = True
    return largest


def _row_runs(mask: np.ndarray) -> tuple[np.ndarray, list[int], list[int]]:
    """Runs of True in each row, in row order: their rows, first columns and one-past-last columns."""
    padded = np.pad(mask, ((0, 0), (1, 1))).astype(np.int8)
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)
    return rows, starts.tolist(), ends.tolist()


def _colour_name(rgb: np.ndarray) -> str | None:
    hue, saturation, _ = colorsys.rgb_to_hsv(*(rgb / 255))
    if saturation < MIN_SATURATION:
        return None
    distances = {name: _hue_distance(hue * 360, hue_of) for name, hue_of in _palette_hues().items()}
    name = min(distances, key=distances.get)
    return name if distances[name] <= MAX_HUE_DISTANCE else None


@functools.cache
def _palette_hues() -> dict[str, float]:
    return {name: colorsys.rgb_to_hsv(*(np.array(rgb) / 255))[0] * 360 for name, rgb in PALETTE.items()}


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360
    return min(d, 360 - d)


def _shape_name(region: np.ndarray) -> str | None:
    box = _bounding_box(region)
    if max(box.shape) > MAX_ASPECT * min(box.shape):
        return None
    on_grid = _to_grid(box)
    matches = {shape: _iou(on_grid, template) for shape, template in _templates().items()}
    best = max(matches, key=matches.get)
    return best if matches[best] >= MIN_MATCH else None


def _bounding_box(region: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(region)
    return region[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _to_grid(box: np.ndarray) -> np.ndarray:
    """A region's bounding box stretched to GRID x GRID, so that position and size no longer matter."""
    resized = Image.fromarray(box.astype(np.uint8) * 255).resize((GRID, GRID), Image.BILINEAR)
    return np.asarray(resized) >= 128


@functools.cache
def _templates() -> dict[str, np.ndarray]:
    """Each shape of the world as drawn by render_shape and read by this judge, so both share every convention."""
    templates = {}
    for shape in SHAPES:
        image = _demo_data.render_shape(next(iter(PALETTE)), shape, (256, 256), random.Random(0))
        templates[shape] = _to_grid(_bounding_box(_shape_region(_smoothed_pixels(image))))
    return templates


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())
