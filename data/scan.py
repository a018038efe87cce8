"""Find the training images and describe each one (REFERENCE §2.1-§2.4, §2.8, §3.2).

`data_root` is a folder (walked recursively) or a manifest `.json` file. Only file headers are read
here: decoding every image at start-up would cost minutes on a large dataset. Pixels are decoded per
epoch by `data.images`, in data-loader workers.

Nothing here stops for one bad file: an image that cannot be read, or whose own caption file is
broken, is skipped; a broken folder file (local.yaml, multiply.txt, ...) is ignored as if absent.
Both are listed in `ScanResult.skipped` with the reason, for the start-up summary.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from PIL import Image

from data.images import MAX_IMAGE_PIXELS, exif_orientation
from data.records import Caption, DataError, ImageRecord, SkippedFiles, Tag, without_path
from data.settings import (GLOBAL_FILES, LOCAL_FILES, SIDECAR_EXTENSIONS, Notify, Settings,
                           SettingsError, manifest_entry, merge, read_folder_file, read_manifest,
                           read_sidecar, record_fields)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".jfif")

# EXIF orientations 5-8 rotate by 90 degrees (or transpose), so width and height swap.
_SWAPS_AXES = {5, 6, 7, 8}


class Notices:
    """Warnings about files that are still used (unlike skipped ones), grouped by message so that
    10,000 images with the same problem make one line, not 10,000."""

    def __init__(self) -> None:
        self._paths: dict[str, dict[str, None]] = {}

    def add(self, message: str, path: str) -> None:
        self._paths.setdefault(message, {})[path] = None

    def lines(self, examples: int = 3) -> list[str]:
        out = []
        for message, paths in self._paths.items():
            if len(paths) == 1:
                out.append(f"{next(iter(paths))}: {message}")
            else:
                shown = ", ".join(list(paths)[:examples])
                out.append(f"{message}: {len(paths)} files, e.g. {shown}")
        return out


@dataclass
class ScanResult:
    data_root: str
    records: list[ImageRecord] = field(default_factory=list)
    skipped: SkippedFiles = field(default_factory=SkippedFiles)
    notices: Notices = field(default_factory=Notices)

    @property
    def problems(self) -> list[tuple[str, str]]:
        """(path, reason) of every skipped file, in the order met."""
        return self.skipped.items()

    def summary_lines(self) -> list[str]:
        """The start-up warnings: every skipped file once with its reason, then grouped notices."""
        lines = []
        if self.skipped:
            lines.append(f"{len(self.skipped)} file(s) skipped (the rest of the dataset trains):")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped.items()]
        return lines + self.notices.lines()

    def require_images(self) -> None:
        """Raise DataError if nothing trainable was found (§2.1: an empty dataset aborts)."""
        if not self.records:
            detail = ""
            if self.skipped:
                path, reason = self.skipped.items()[0]
                detail = (f" {len(self.skipped)} file(s) could not be used, e.g. {path}: {reason}.")
            raise DataError(
                f"No usable training images in data_root '{self.data_root}'.{detail} Put image files "
                f"({' '.join(IMAGE_EXTENSIONS)}) with optional .txt/.caption/.yaml captions in that "
                f"folder or its subfolders, or point data_root at the folder (or manifest .json) "
                f"that has them.")
        total = math.fsum(r.multiply for r in self.records)
        if total < 1:
            raise DataError(
                f"The multiply values of the {len(self.records)} usable image(s) in '{self.data_root}' "
                f"add up to {total:g}: less than one image per epoch. Raise multiply (multiply.txt or "
                f"the yaml 'multiply' key) so that they add up to at least 1.")


def scan(data_root: str) -> ScanResult:
    """Records for every usable image of `data_root` (a folder or a manifest .json), plus what was
    skipped and why. A data_root that is neither, or a manifest that is not a JSON array, is a
    DataError at once."""
    if os.path.isfile(data_root) and data_root.lower().endswith(".json"):
        return _scan_manifest(data_root)
    if not os.path.isdir(data_root):
        raise DataError(f"data_root '{data_root}' is neither a folder nor a manifest .json file: set "
                        f"data_root to the folder that holds the training images.")
    result = ScanResult(data_root=os.path.abspath(data_root))
    walker = _Walker(result)
    walker.folder(result.data_root, Settings())
    _describe_all(result, walker.jobs)
    return result


# Scans of at least this many images read captions and headers in worker processes (one per core,
# at most _MAX_PROCESSES); below it, starting them costs more than it saves. The work is Python
# (header parsing, yaml, merging) and so GIL-bound: threads would not help.
PARALLEL_MIN_IMAGES = 4000
_MAX_PROCESSES = 8
_CHUNK = 500

# One image to describe: (image path, its sidecar paths in reading order, its folder's settings).
_Job = tuple[str, tuple[str, ...], Settings]


def _describe_all(result: ScanResult, jobs: list[_Job]) -> None:
    chunks = [jobs[i:i + _CHUNK] for i in range(0, len(jobs), _CHUNK)]
    processes = min(_MAX_PROCESSES, os.cpu_count() or 1)
    if len(jobs) >= PARALLEL_MIN_IMAGES and processes > 1:
        with ProcessPoolExecutor(max_workers=processes) as pool:
            outcomes = list(pool.map(_describe_chunk, chunks))
    else:
        outcomes = [_describe_chunk(chunk) for chunk in chunks]
    for described, notices in outcomes:  # in scan order, whichever process did the work
        for path, outcome in described:
            if isinstance(outcome, str):
                result.skipped.add(path, outcome)
            else:
                result.records.append(_record(path, outcome))
        for message, path in notices:
            result.notices.add(message, path)


def _describe_chunk(jobs: list[_Job]) -> tuple[list, list[tuple[str, str]]]:
    """(path, `_describe` outcome) per image, plus (message, path) notices. Runs in a worker
    process for large scans, so it returns everything it finds."""
    notices: list[tuple[str, str]] = []

    def notify(message: str, path: str) -> None:
        notices.append((message, path))

    described = []
    for path, sidecars, folder_settings in jobs:
        try:
            sources = [folder_settings] + [read_sidecar(p, notify) for p in sidecars]
        except SettingsError as e:
            described.append((path, f"its caption file is unusable: {e}"))
            continue
        described.append((path, _describe(path, merge(sources), notify)))
    return described, notices


def _describe(path: str, settings: Settings, notify: Notify):
    """The reason the image at `path` cannot be used, or its record's values for `_record`:
    plain values, since pickling ImageRecords (with their Caption and Tags) back from a worker
    process costs more than the header read itself."""
    try:
        width, height = oriented_size(path)
    except Exception as e:  # noqa: BLE001 - any failure to read a header means "skip this file"
        return unreadable_reason(path, e)
    fields = record_fields(settings, path)
    caption = fields.pop("caption")
    if not caption.text():
        notify("empty caption (no caption file, folder file or file name gives any text): trained "
               "as an unconditional sample; add a .txt caption", path)
    return width, height, caption.main_prompt, [tuple(t) for t in caption.tags], fields


def _record(path: str, values: tuple) -> ImageRecord:
    width, height, main_prompt, tags, fields = values
    return ImageRecord(path=path, caption=Caption(main_prompt, tuple(Tag(*t) for t in tags)),
                       width=width, height=height, **fields)


@dataclass
class _Folder:
    images: list[str] = field(default_factory=list)
    subfolders: list[str] = field(default_factory=list)
    sidecars: dict[tuple[str, str], str] = field(default_factory=dict)   # (stem, .ext) -> path
    folder_files: dict[str, str] = field(default_factory=dict)           # lower-case name -> path


class _Walker:
    """Depth-first walk (§2.1): a folder's images, then its subfolders, each in name order so the
    order, and everything seeded from it, is the same on every filesystem. Names starting with '.'
    are skipped. Symlinked folders are followed once each (a link back to an ancestor would
    otherwise loop forever). Folder files are read here; each image becomes a `_Job`."""

    def __init__(self, result: ScanResult):
        self.result = result
        self.seen_dirs: set[str] = set()
        self.jobs: list[_Job] = []

    def folder(self, path: str, inherited: Settings) -> None:
        real = os.path.realpath(path)
        if real in self.seen_dirs:
            return
        self.seen_dirs.add(real)
        listing = self._list(path)
        if listing is None:
            return
        # global.yaml applies here and below, over the parents' (§2.4); folder files apply here only.
        inherited_here = merge([inherited, *self._folder_files(listing, GLOBAL_FILES)])
        folder_settings = merge([inherited_here, *self._folder_files(listing, LOCAL_FILES)])
        for image in listing.images:
            stem = os.path.splitext(os.path.basename(image))[0]
            sidecars = tuple(p for p in (listing.sidecars.get((stem, ext)) for ext in SIDECAR_EXTENSIONS)
                             if p)
            self.jobs.append((image, sidecars, folder_settings))
        for sub in listing.subfolders:
            self.folder(sub, inherited_here)

    def _list(self, path: str) -> Optional[_Folder]:
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:
            self.result.skipped.add(path, f"cannot list folder ({e.strerror or e}); check its "
                                          f"permissions")
            return None
        listing = _Folder()
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if entry.is_dir():
                listing.subfolders.append(entry.path)
                continue
            stem, ext = os.path.splitext(name)
            ext = ext.lower()
            if ext in IMAGE_EXTENSIONS:
                if entry.is_file():
                    listing.images.append(entry.path)
                else:
                    self.result.skipped.add(entry.path, "not a readable file (a broken link?); fix or "
                                                        "remove it")
            elif ext in SIDECAR_EXTENSIONS:
                # Extensions match in any case (photo.TXT), as on the Windows machines many
                # EveryDream2 datasets were built on; the base name must match exactly.
                listing.sidecars[(stem, ext)] = entry.path
                listing.folder_files[name.lower()] = entry.path
        return listing

    def _folder_files(self, listing: _Folder, names: tuple[str, ...]) -> list[Settings]:
        out = []
        for name in names:
            path = listing.folder_files.get(name)
            if path is None:
                continue
            try:
                out.append(read_folder_file(path, name, self.result.notices.add))
            except SettingsError as e:
                self.result.skipped.add(path, f"{without_path(str(e), path)} (the file is ignored)")
        return out


class _TooLarge(ValueError):
    pass


_JPEG_EXTENSIONS = (".jpg", ".jpeg", ".jfif")


def oriented_size(path: str) -> tuple[int, int]:
    """(width, height) as displayed, from the header only: no pixels are decoded. Raises for a
    file PIL cannot identify, and _TooLarge for one above MAX_IMAGE_PIXELS."""
    header = None
    if path.lower().endswith(_JPEG_EXTENSIONS):
        with open(path, "rb") as f:
            header = jpeg_header(f)
    if header is None:  # not a JPEG, or one jpeg_header leaves to PIL
        with warnings.catch_warnings():
            # PIL warns between its limit and twice that; the check below turns it into a skip.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                header = (*img.size, exif_orientation(img))
    width, height, orientation = header
    if width * height > MAX_IMAGE_PIXELS:
        raise _TooLarge(f"{width}x{height} is {width * height / 1e6:.0f} megapixels")
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    return (height, width) if orientation in _SWAPS_AXES else (width, height)


# Start-of-frame markers: the ones PIL's JPEG plugin opens (not DHT 0xC4, JPG 0xC8, DAC 0xCC).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: no length field


def jpeg_header(f) -> Optional[tuple[int, int, int]]:
    """(width, height, EXIF orientation) of a baseline/progressive 8-bit JPEG, read from its
    markers up to the frame header; None for anything else or anything unusual, which PIL then
    opens (and rejects, if it is broken). PIL's own header parser also decodes every table it
    passes, in Python: this reader skips them and costs a third as much, which is most of a
    scan's time on a large JPEG dataset."""
    if f.read(2) != b"\xff\xd8":
        return None
    orientation = None
    while True:
        prefix = f.read(2)
        if len(prefix) < 2 or prefix[0] != 0xFF:
            return None
        marker = prefix[1]
        while marker == 0xFF:  # fill bytes before a marker
            byte = f.read(1)
            if not byte:
                return None
            marker = byte[0]
        if marker in _JPEG_STANDALONE:
            continue
        raw_length = f.read(2)
        if len(raw_length) < 2 or marker in (0xD8, 0xD9, 0xDA):  # SOI, EOI, scan before a frame
            return None
        length = struct.unpack(">H", raw_length)[0] - 2
        if length < 0:
            return None
        if marker in _JPEG_SOF:
            frame = f.read(6)
            if len(frame) < 6:
                return None
            bits, height, width, components = struct.unpack(">BHHB", frame)
            if bits != 8 or components not in (1, 3, 4) or not height or not width:
                return None
            return width, height, orientation or 1
        if marker == 0xE1 and orientation is None:
            segment = f.read(length)
            if segment[:6] == b"Exif\x00\x00":  # the first Exif block counts, as in PIL
                orientation = _tiff_orientation(segment[6:])
        else:
            f.seek(length, 1)


def _tiff_orientation(tiff: bytes) -> int:
    """The Orientation tag of a TIFF/EXIF block's first IFD; 1 when absent or unreadable (a broken
    EXIF block counts as no orientation, as in data.images.exif_orientation)."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
            tag, kind = struct.unpack_from(order + "HH", tiff, entry)
            if tag == 0x0112:
                value = struct.unpack_from(order + ("H" if kind == 3 else "I"), tiff, entry + 8)[0]
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1


def unreadable_reason(path: str, error: Exception) -> str:
    """Why an image file cannot be used, and what to do about it."""
    try:
        empty = os.path.getsize(path) == 0
    except OSError:
        empty = False
    if empty:
        return "empty file (0 bytes); replace it with the image or remove it"
    text = str(error)
    limit = f"images above {MAX_IMAGE_PIXELS // 1_000_000} megapixels are skipped as a guard " \
            f"against decompression bombs; downscale it"
    if isinstance(error, Image.DecompressionBombError):
        # PIL refuses at twice its limit, before the size is known to us
        return f"too large (its header claims over {2 * MAX_IMAGE_PIXELS // 1_000_000} megapixels); {limit}"
    if isinstance(error, _TooLarge):
        return f"too large ({text}); {limit}"
    if isinstance(error, Image.UnidentifiedImageError):
        return ("not a readable image (corrupt, or another format with an image extension); "
                "re-save it as JPEG or PNG, or remove it")
    return f"cannot read the image ({type(error).__name__}: {text}); re-save it or remove it"


# ---------------------------------------------------------------- manifests

def _scan_manifest(path: str) -> ScanResult:
    """§2.8: a JSON array of §2.3 entries, each naming its `image`. No folder files apply. Relative
    image paths resolve against the working directory (as EveryDream2), else the manifest's folder
    (where a hand-written manifest's paths usually point)."""
    result = ScanResult(data_root=os.path.abspath(path))
    try:
        text, entries = read_manifest(path)
    except SettingsError as e:
        raise DataError(f"data_root manifest unusable: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    for index, entry in enumerate(entries):
        label = f"{path} (entry {index + 1})"
        try:
            image, settings = manifest_entry(entry, index, path, text, result.notices.add)
        except SettingsError as e:
            result.skipped.add(label, str(e))
            continue
        if not image:
            result.skipped.add(label, "has no 'image' key naming the image file; add one")
            continue
        found = _resolve(image, base)
        if found is None:
            result.skipped.add(label, f"image '{image}' not found (relative paths resolve against "
                                      f"the working directory, then the manifest's folder)")
            continue
        # merged alone, for the ordering of tags by weight that merging gives every other source
        outcome = _describe(found, merge([settings]), result.notices.add)
        if isinstance(outcome, str):
            result.skipped.add(found, outcome)
        else:
            result.records.append(_record(found, outcome))
    return result


def _resolve(image: str, base: str) -> Optional[str]:
    for candidate in (image, os.path.join(base, image)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return None
