"""Find the training images under a folder and describe each one (REFERENCE §2.1, §2.2, §3.2).

Only file headers are read here: decoding every image at start-up would cost minutes on a large
dataset. Pixels are decoded per epoch by `data.images`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Iterator

from PIL import Image

from data.captions import caption_for_image
from data.images import exif_orientation
from data.records import DataError, ImageRecord

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".jfif")

# EXIF orientations 5-8 rotate by 90 degrees (or transpose), so width and height swap.
_SWAPS_AXES = {5, 6, 7, 8}


@dataclass
class ScanResult:
    data_root: str
    records: list[ImageRecord] = field(default_factory=list)
    # (path, reason) for every image file that was skipped; the caller shows or writes them
    problems: list[tuple[str, str]] = field(default_factory=list)

    def require_images(self) -> None:
        """Raise DataError if nothing trainable was found (§2.1: an empty dataset aborts)."""
        if self.records:
            return
        detail = (f" {len(self.problems)} image file(s) could not be read, e.g. "
                  f"{self.problems[0][0]}: {self.problems[0][1]}." if self.problems else "")
        raise DataError(
            f"No usable training images in data_root '{self.data_root}'.{detail} Put image files "
            f"({' '.join(IMAGE_EXTENSIONS)}) with optional .txt/.caption captions in that folder "
            f"or its subfolders, or point data_root at the folder that has them.")


def iter_image_files(data_root: str) -> Iterator[str]:
    """Image paths under `data_root`, depth-first: a folder's files, then its subfolders (§2.1).

    Names starting with '.' are skipped, files and folders alike. Entries are sorted by name so the
    order, and everything seeded from it, is the same on every filesystem. Symlinked folders are
    followed once each (a link back to an ancestor would otherwise loop forever).
    """
    seen_dirs: set[str] = set()

    def walk(folder: str) -> Iterator[str]:
        real = os.path.realpath(folder)
        if real in seen_dirs:
            return
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            log.warning("cannot list folder %s: %s", folder, e)
            return
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                subfolders.append(entry.path)
            elif entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                yield entry.path
        for sub in subfolders:
            yield from walk(sub)

    yield from walk(data_root)


def oriented_size(path: str) -> tuple[int, int]:
    """(width, height) as displayed, from the header only: `Image.open` reads the header and the
    EXIF block but decodes no pixels. Raises for a file PIL cannot identify."""
    with Image.open(path) as img:
        width, height = img.size
        if exif_orientation(img) in _SWAPS_AXES:
            width, height = height, width
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    return width, height


def scan(data_root: str) -> ScanResult:
    """Records for every readable image under `data_root`, plus the files that were skipped.

    An image whose header cannot be read (corrupt, empty, not really an image) or whose caption
    file cannot be read is skipped, logged and listed in `problems`; it never stops the scan.
    A data_root that is not a folder is a DataError at once.
    """
    if not os.path.isdir(data_root):
        raise DataError(f"data_root '{data_root}' is not a folder: set data_root to the folder "
                        f"that holds the training images.")
    result = ScanResult(data_root=os.path.abspath(data_root))
    for path in iter_image_files(result.data_root):
        try:
            width, height = oriented_size(path)
            caption = caption_for_image(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # PIL raises OSError (UnidentifiedImageError) for unknown data, SyntaxError/ValueError
            # for some malformed headers; the exception text is the most useful reason we have.
            reason = f"{type(e).__name__}: {e}"
            log.error("skipping %s: %s", path, reason)
            result.problems.append((path, reason))
            continue
        result.records.append(ImageRecord(path=path, caption=caption, width=width, height=height))
    log.info("scanned %s: %d images, %d skipped",
             result.data_root, len(result.records), len(result.problems))
    return result
