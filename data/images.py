"""Decode one image for training: RGB, oriented, cropped and resized to its bucket (REFERENCE §2.9).

Every random choice comes from the `random.Random` passed in, so a sample's pixels depend only on
that generator's seed, never on which worker decoded it or in what order.
"""

from __future__ import annotations

import random
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image

from data.records import DataError

# Images with more pixels than this are skipped by the scan. PIL's own guard (warn above its limit,
# refuse above twice that) is set to the same number so that a file which slips past the scan (it
# changed on disk) is refused by PIL in the loader rather than decoded. 200 megapixels is above any
# camera photo or scan a dataset plausibly holds (a 100 MP medium-format photo is 11648x8736), and
# still decodes within ~0.8 GB (RGBA) per data-loader worker. A "decompression bomb" (a small file
# whose header claims e.g. 100000x100000 pixels) is caught from its header alone, before any memory
# is spent on it.
MAX_IMAGE_PIXELS = 200_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

_EXIF_ORIENTATION_TAG = 0x0112

# How each EXIF orientation is undone (the same mapping as PIL.ImageOps.exif_transpose).
_UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Crop jitter trims at most this fraction of the shorter side from each edge (§2.9).
MAX_CROP_JITTER = 0.02

# JPEGs are decoded at a reduced DCT scale while they stay at least this many times the bucket
# size: decoding a 6000x4000 photo for a 512 px bucket at 1/4 scale is several times faster, and
# resizing down from >= 2x still looks like resizing from full size. The 2% jitter cap is what
# binds at >= 2x oversize, so jitter behaves as on the full-size image.
_DRAFT_MARGIN = 2


def exif_orientation(img: Image.Image) -> int:
    """EXIF orientation 1..8 of an opened image, from its header only (1 if absent or unreadable).

    The scan and the loader both use this, so the size the bucket was chosen from is the size the
    loader sees. For PNG only an eXIf chunk before the pixel data is looked at: PIL's getexif()
    would decode the whole image to look for one after it. A broken EXIF block counts as "no
    orientation" rather than losing the image.
    """
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = int(exif.get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF comes in many shapes; none is fatal
        return 1
    return value if value in _UNDO_ORIENTATION else 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB.

    Transparency is composited over white (a transparent background becomes white, not whatever
    colour the hidden pixels have). 16/32-bit greyscale ("I;16*", "I", "F") is scaled to 8 bits:
    PIL's own conversion clips at 255, turning most of a 16-bit image white. "I"/"F" data that
    already fits in 0..255 is taken as 8-bit. CMYK, YCbCr, palette, 1-bit and L use PIL's converter.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        values = np.asarray(img).astype(np.float32)
        if img.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0  # 65535 -> 255
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def _orient_and_draft(img: Image.Image, min_size: tuple[int, int] | None) -> int:
    """Reads the EXIF orientation of an opened, not yet decoded image and, with `min_size` (w, h, as
    displayed), lets a JPEG decode at a reduced scale as long as both sides stay at least that large."""
    orientation = exif_orientation(img)
    if min_size is not None and img.format == "JPEG":
        w, h = min_size
        if orientation in (5, 6, 7, 8):
            w, h = h, w  # the file's pixels are stored rotated
        img.draft(None, (w, h))
    return orientation


def open_oriented_rgb(path: str, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Open `path` as upright RGB (see _orient_and_draft for `min_size`)."""
    with Image.open(path) as img:  # closes the file even when decoding fails
        orientation = _orient_and_draft(img, min_size)
        img.load()
    if orientation != 1:
        img = img.transpose(_UNDO_ORIENTATION[orientation])
    return to_rgb(img)


def crop_box(size: tuple[int, int], bucket: tuple[int, int], rng: random.Random,
             jitter: bool = True) -> tuple[float, float, float, float]:
    """The (left, top, right, bottom) region of an image of `size` to resize into `bucket`.

    1. Crop jitter: each edge loses a random 0..min(2%, relative oversize) of the shorter side,
       where the relative oversize is how much larger than the bucket the image is (none for an
       image not larger than the bucket, or when `jitter` is off, e.g. for validation).
    2. The rest is trimmed to the bucket's aspect along the long axis, at an offset drawn from a
       triangular distribution: centred crops are the most likely, edge crops still happen.
    """
    w, h = size
    bw, bh = bucket
    left, top, right, bottom = 0.0, 0.0, float(w), float(h)
    oversize = min(w / bw, h / bh) - 1.0
    if jitter and oversize > 0:
        max_trim = int(min(MAX_CROP_JITTER, oversize) * min(w, h))
        if max_trim > 0:
            left += rng.randint(0, max_trim)
            top += rng.randint(0, max_trim)
            right -= rng.randint(0, max_trim)
            bottom -= rng.randint(0, max_trim)
    cw, ch = right - left, bottom - top
    target = bw / bh
    if cw / ch > target:  # too wide: trim left/right
        new_w = ch * target
        offset = rng.triangular(0.0, cw - new_w)
        left, right = left + offset, left + offset + new_w
    elif cw / ch < target:  # too tall: trim top/bottom
        new_h = cw / target
        offset = rng.triangular(0.0, ch - new_h)
        top, bottom = top + offset, top + offset + new_h
    return left, top, right, bottom


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float32 CHW tensor in [-1, 1] (the VAE's input range)."""
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr / 127.5 - 1.0))


def _decode_error(path: str, e: Exception) -> DataError:
    return DataError(f"{path}: cannot decode the image ({type(e).__name__}: {e}); "
                     f"re-save it with an image editor or remove it from the dataset")


class Crop(NamedTuple):
    """A crop box and the size of the decoded, upright image it is in (a JPEG's draft scale makes that smaller
    than the file's size)."""

    size: tuple[int, int]
    box: tuple[float, float, float, float]

    def box_in(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The same region of an image of another `size` that covers the same picture (the image's mask)."""
        sx, sy = size[0] / self.size[0], size[1] / self.size[1]
        left, top, right, bottom = self.box
        return left * sx, top * sy, right * sx, bottom * sy


def training_crop(path: str, bucket: tuple[int, int], rng: random.Random, jitter: bool = True) -> Crop:
    """The crop `load_training_image` draws from `rng` in the same state, read from the file's
    header alone (size, orientation, JPEG draft scale): the latent cache keys on its box before deciding
    whether the image needs decoding at all, and the image's mask is cut to it."""
    bw, bh = bucket
    try:
        with Image.open(path) as img:
            orientation = _orient_and_draft(img, (_DRAFT_MARGIN * bw, _DRAFT_MARGIN * bh))
            w, h = img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _decode_error(path, e) from e
    size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return Crop(size, crop_box(size, bucket, rng, jitter))


def load_training_image(path: str, bucket: tuple[int, int], rng: random.Random,
                        jitter: bool = True, flip: bool = False,
                        transform: Optional[Callable[[Image.Image], Image.Image]] = None) -> torch.Tensor:
    """Decode `path` into a [3, bucket_h, bucket_w] float tensor in [-1, 1] (REFERENCE §2.9).

    Crop and resize happen in one PIL resize call (default filter), which also upscales images
    smaller than the bucket; `flip` then mirrors it left to right; `transform` (the plugins' image
    transform) then gets the bucket-sized RGB image and returns the one to train on. A file that
    passed the scan but cannot be decoded (e.g. truncated data after a valid header) raises
    DataError naming it; whatever `transform` raises is not caught here.
    """
    bw, bh = bucket
    try:
        img = open_oriented_rgb(path, min_size=(_DRAFT_MARGIN * bw, _DRAFT_MARGIN * bh))
        box = crop_box(img.size, bucket, rng, jitter)
        img = img.resize((bw, bh), box=box)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _decode_error(path, e) from e
    if transform is not None:
        img = transform(img)
    return to_tensor(img)


def load_training_mask(path: str, crop: Crop, bucket: tuple[int, int], flip: bool) -> torch.Tensor:
    """Decode the mask at `path` into a [1, bucket_h, bucket_w] uint8 tensor (255 = learn), cut from the region
    `crop` cuts from its image, resized and flipped as the image is. Any image mode is read as its 8-bit grey
    level (transparency counts as white, as in images). Raises DataError naming the mask when it cannot be
    decoded."""
    try:
        mask = open_oriented_rgb(path).convert("L")
        mask = mask.resize(bucket, box=crop.box_in(mask.size))
        if flip:
            mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode the mask ({type(e).__name__}: {e})") from e
    return torch.from_numpy(np.array(mask, dtype=np.uint8))[None]
