"""Aspect-ratio bucket tables and bucket assignment (REFERENCE §3.1, §3.2).

Every training image is cropped to the aspect of one bucket and resized to exactly that bucket's
size, so all images of a batch share one tensor shape. The tables below are EveryDream2's, kept
verbatim (including the odd "(compat)" entries) so bucket keys, schedules and per-bucket counts
match what existing datasets and configs expect.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterable, Sequence

from data.records import ImageRecord

Bucket = tuple[int, int]  # (width, height) in pixels


def _pairs(*sizes: tuple[int, int]) -> tuple[Bucket, ...]:
    return tuple((int(w), int(h)) for w, h in sizes)


# REFERENCE §3.1, in table order: the first entry is the square one, then landscape/portrait pairs.
# Order matters: ties in nearest_bucket go to the earlier entry.
BUCKET_TABLES: dict[int, tuple[Bucket, ...]] = {
    256: _pairs((256, 256), (384, 192), (192, 384), (512, 128), (128, 512)),
    320: _pairs((320, 320), (384, 256), (256, 384), (448, 192), (192, 448), (576, 128),
                (576, 640)),  # (compat) 576x640 instead of 128x576, as in EveryDream2
    384: _pairs((384, 384), (448, 320), (320, 448), (512, 256), (256, 512), (704, 192), (192, 704)),
    448: _pairs((448, 448), (512, 384), (384, 512), (640, 320), (320, 640), (768, 256), (256, 768)),
    512: _pairs((512, 512), (576, 448), (448, 576), (640, 384), (384, 640), (768, 320), (320, 768),
                (896, 256), (256, 896), (1024, 256), (256, 1024)),
    576: _pairs((576, 576), (640, 512), (512, 640), (704, 448), (448, 704), (832, 384), (384, 832),
                (960, 320), (320, 960), (1152, 256), (256, 1152)),
    640: _pairs((640, 640), (704, 576), (576, 704), (768, 512), (512, 768), (832, 448), (448, 832),
                (896, 448), (448, 896), (1024, 384), (384, 1024), (1152, 320), (320, 1152),
                (1280, 320), (320, 1280)),
    704: _pairs((704, 704), (768, 640), (640, 768), (832, 576), (576, 832), (960, 512), (512, 960),
                (1088, 448), (448, 1088), (1152, 384), (384, 1152), (1280, 384), (384, 1280),
                (1280, 320), (320, 1280)),
    768: _pairs((768, 768), (832, 704), (704, 832), (896, 640), (640, 896), (960, 576), (576, 960),
                (1024, 576), (576, 1024), (1152, 512), (512, 1152), (1280, 448), (448, 1280),
                (1408, 384), (384, 1408), (1472, 320), (320, 1472)),
    832: _pairs((832, 832), (896, 768), (768, 896), (960, 704), (704, 960), (1024, 640), (640, 1024),
                (1152, 576), (576, 1152), (1216, 512), (512, 1216), (1344, 512), (512, 1344),
                (1536, 448), (448, 1536), (1600, 384), (384, 1600)),
    896: _pairs((896, 896), (1024, 768), (768, 1024), (1088, 704), (704, 1088), (1216, 640),
                (640, 1216), (1344, 576), (576, 1344), (1536, 512), (512, 1536), (1792, 448),
                (448, 1792)),
    960: _pairs((960, 960), (1088, 832), (832, 1088), (1152, 768), (768, 1152), (1280, 704),
                (704, 1280), (1408, 640), (640, 1408), (1680, 576), (576, 1680), (1792, 512),
                (512, 1792), (2048, 448), (448, 2048)),
    1024: _pairs((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768),
                 (768, 1344), (1472, 704), (704, 1472), (1600, 640), (640, 1600), (1792, 576),
                 (576, 1792), (2048, 512), (512, 2048)),
    1088: _pairs((1088, 1088), (1152, 1024), (1024, 1152), (1216, 896), (896, 1216), (1408, 832),
                 (832, 1408), (1536, 768), (768, 1536), (1664, 704), (704, 1664), (1792, 640),
                 (640, 1792), (2048, 576), (576, 2048), (2304, 512), (512, 2304)),
    1152: _pairs((1152, 1152), (1280, 1024), (1024, 1280), (1344, 960), (960, 1344), (1472, 896),
                 (896, 1472), (1536, 832), (832, 1536), (1728, 768), (768, 1728), (1856, 704),
                 (704, 1856), (2048, 640), (640, 2048), (2304, 576), (576, 2304)),
    1280: _pairs((1280, 1280), (1408, 1152),
                 (1408, 1344),  # (compat) EveryDream2 has this instead of 1152x1408
                 (1600, 1024), (1024, 1600), (1792, 896), (896, 1792), (1920, 832), (832, 1920),
                 (2112, 768), (768, 2112), (2304, 704), (704, 2304), (2560, 640), (640, 2560)),
    1536: _pairs((1536, 1536), (1728, 1344), (1344, 1728), (1792, 1280), (1280, 1792), (2048, 1152),
                 (1152, 2048), (2304, 1024), (1024, 2304), (2432, 960), (960, 2432), (2624, 896),
                 (896, 2624), (2816, 832), (832, 2816), (3072, 768), (768, 3072)),
}

# Derived tables are rounded to this grid (and every side is at least this). A 64 grid would
# collapse most of a 64/128 px table into the square; sides that are not multiples of 64 are fine
# because diffusers' UNet forwards skip-connection sizes (EveryDream2's own tables have 1680x576).
_DERIVED_GRID = 32


def _derived_table(resolution: int) -> tuple[Bucket, ...]:
    """Scale the 512 table by resolution/512, rounding each side to the nearest multiple of 32
    (halves round up, minimum 32). Rounding can make two entries equal (at 64 px, 576x448 becomes
    64x64 like the square); later duplicates are dropped so the square stays first and order is
    otherwise kept."""
    scale = resolution / 512

    def snap(side: int) -> int:
        return max(_DERIVED_GRID, math.floor(side * scale / _DERIVED_GRID + 0.5) * _DERIVED_GRID)

    table: list[Bucket] = []
    for w, h in BUCKET_TABLES[512]:
        bucket = (snap(w), snap(h))
        if bucket not in table:
            table.append(bucket)
    return tuple(table)


def buckets_for(resolution: int) -> list[Bucket]:
    """The bucket table for `resolution`.

    Resolutions of REFERENCE §3.1 get EveryDream2's table verbatim. Any other positive multiple of
    64 (the tiny demo/test models train at 64 or 128 px; EveryDream2 has no such tables) gets a table
    derived from the 512 one, see `_derived_table`. Anything else is a ValueError: the config layer
    decides whether to round a JSON value first (§3.1 says "rounded down to a multiple of 64").
    """
    resolution = int(resolution)
    if resolution in BUCKET_TABLES:
        return list(BUCKET_TABLES[resolution])
    if resolution > 0 and resolution % 64 == 0:
        return list(_derived_table(resolution))
    known = ", ".join(str(r) for r in BUCKET_TABLES)
    raise ValueError(
        f"resolution {resolution} has no bucket table: use one of {known}, "
        f"or another multiple of 64 for a derived table")


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to width/height (REFERENCE §3.2).

    Uses the same float expression as EveryDream2, |bw/bh - w/h|, and `min`, which keeps the first
    of equal candidates, so ties go to the earlier table entry exactly as there.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("empty bucket table")
    aspect = width / height
    return min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))


def assign_buckets(records: Iterable[ImageRecord], resolution: int) -> list[ImageRecord]:
    """Copies of `records` with `bucket` set from their (EXIF-oriented) header size."""
    table = buckets_for(resolution)
    return [dataclasses.replace(r, bucket=nearest_bucket(r.width, r.height, table)) for r in records]


def is_undersized(record: ImageRecord) -> bool:
    """REFERENCE §2.1: smaller than its bucket (it will be upscaled, so the user gets a warning).

    Both sides must differ from the bucket's and the area must be under 1.02² × the bucket area;
    an image that already matches one side exactly is not listed.
    """
    if record.bucket is None:
        raise ValueError(f"{record.path}: no bucket assigned yet (call assign_buckets first)")
    bw, bh = record.bucket
    return (record.width != bw and record.height != bh
            and record.width * record.height < 1.02 ** 2 * bw * bh)


UNDERSIZED_FILE = "undersized_images.txt"
# How many undersized images the console warning names; the file lists them all.
_UNDERSIZED_SHOWN = 10


def report_undersized(records: Sequence[ImageRecord], run_folder) -> list[str]:
    """List the images smaller than their bucket (§2.1) in `<run_folder>/undersized_images.txt`, one
    `path: WxH, bucket WxH` line each, and return the warning lines for the console (none, and no
    file, when every image is large enough). They still train, upscaled to their bucket."""
    small = [r for r in records if is_undersized(r)]
    if not small:
        return []
    lines = [f"{r.path}: {r.width}x{r.height}, bucket {r.bucket[0]}x{r.bucket[1]}" for r in small]
    path = os.path.join(run_folder, UNDERSIZED_FILE)
    # surrogateescape: a file name that is not valid UTF-8 is written back as its own bytes
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write("\n".join(lines) + "\n")
    out = [f"{len(small)} image(s) are smaller than their bucket and are upscaled, which blurs them; "
           f"use larger originals where you can (all listed in {path}):"]
    out += [f"  {line}" for line in lines[:_UNDERSIZED_SHOWN]]
    if len(small) > _UNDERSIZED_SHOWN:
        out.append(f"  ... and {len(small) - _UNDERSIZED_SHOWN} more")
    return out
