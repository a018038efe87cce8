"""Find the training images and describe each one (REFERENCE §2.1-§2.4, §2.8, §3.2).

`data_root` is a folder (walked recursively) or a manifest `.json` file. Only file headers are read
here: decoding every image at start-up would cost minutes on a large dataset. Pixels are decoded per
epoch by `data.images`, in data-loader workers.

Nothing here stops for one bad file: an image that cannot be read, or whose own caption file is
broken, is skipped; a broken folder file (local.yaml, multiply.txt, ...) is ignored as if absent; an
image whose mask is unreadable or not its shape trains without it. All are listed in
`ScanResult.skipped` with the reason, for the start-up summary.
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
from data.settings import (DEFAULT_MASK_SUFFIX, GLOBAL_FILES, LOCAL_FILES, SIDECAR_EXTENSIONS, Notify,
                           Settings, SettingsError, manifest_entry, merge, read_folder_file, read_manifest,
                           read_sidecar, record_fields)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".jfif")

# EXIF orientations 5-8 rotate by 90 degrees (or transpose), so width and height swap.
_SWAPS_AXES = {5, 6, 7, 8}

# A mask whose aspect ratio is further than this from its image's cannot cover the same picture (a mask of
# another resolution is fine: it is scaled to its image).
MASK_ASPECT_TOLERANCE = 0.01


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


def scan(data_root: str, mask_suffix: str = DEFAULT_MASK_SUFFIX) -> ScanResult:
    """Records for every usable image of `data_root` (a folder or a manifest .json), plus what was
    skipped and why. A data_root that is neither, or a manifest that is not a JSON array, is a
    DataError at once. An image's mask is `NAME<mask_suffix>.<ext>` beside it, unless a folder's
    local.yaml or global.yaml (a manifest entry) names another suffix."""
    if os.path.isfile(data_root) and data_root.lower().endswith(".json"):
        return _scan_manifest(data_root, mask_suffix)
    if not os.path.isdir(data_root):
        raise DataError(f"data_root '{data_root}' is neither a folder nor a manifest .json file: set "
                        f"data_root to the folder that holds the training images.")
    result = ScanResult(data_root=os.path.abspath(data_root))
    walker = _Walker(result, mask_suffix)
    walker.folder(result.data_root, Settings())
    _describe_all(result, walker.jobs)
    return result


# Scans of at least this many images read captions and headers in worker processes (one per core,
# at most _MAX_PROCESSES); below it, starting them costs more than it saves. The work is Python
# (header parsing, yaml, merging) and so GIL-bound: threads would not help.
PARALLEL_MIN_IMAGES = 4000
_MAX_PROCESSES = 8
_CHUNK = 500

# One image to describe: (image path, its sidecar paths in reading order, its folder's settings, its mask).
_Job = tuple[str, tuple[str, ...], Settings, Optional[str]]


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
            _add(result, path, outcome)
        for message, path in notices:
            result.notices.add(message, path)


def _add(result: ScanResult, path: str, outcome) -> None:
    """An image's `_describe` outcome joins the result: its record, or the reason it is skipped (and the reason
    its mask is, when the image trains without it)."""
    if isinstance(outcome, str):
        result.skipped.add(path, outcome)
        return
    *values, mask_problem = outcome
    if mask_problem:
        result.skipped.add(*mask_problem)
    result.records.append(_record(path, values))


def _describe_chunk(jobs: list[_Job]) -> tuple[list, list[tuple[str, str]]]:
    """(path, `_describe` outcome) per image, plus (message, path) notices. Runs in a worker
    process for large scans, so it returns everything it finds."""
    notices: list[tuple[str, str]] = []

    def notify(message: str, path: str) -> None:
        notices.append((message, path))

    described = []
    for path, sidecars, folder_settings, mask in jobs:
        try:
            own = [read_sidecar(p, notify) for p in sidecars]
        except SettingsError as e:
            described.append((path, f"its caption file is unusable: {e}"))
            continue
        for sidecar, settings in zip(sidecars, own):
            if settings.mask_suffix is not None:
                # Which files of a folder are masks is settled for the whole folder, before images are described.
                notify("mask_suffix names the masks of a whole folder: set it in local.yaml or global.yaml "
                       "(ignored here)", sidecar)
        described.append((path, _describe(path, merge([folder_settings, *own]), notify, mask)))
    return described, notices


def _describe(path: str, settings: Settings, notify: Notify, mask: Optional[str] = None):
    """The reason the image at `path` cannot be used, or its record's values for `_record` and, last,
    (mask, reason) when its mask cannot be used: plain values, since pickling ImageRecords (with their
    Caption and Tags) back from a worker process costs more than the header read itself."""
    try:
        width, height = oriented_size(path)
    except Exception as e:  # noqa: BLE001 - any failure to read a header means "skip this file"
        return unreadable_reason(path, e)
    fields = record_fields(settings, path)
    caption = fields.pop("caption")
    if not caption.text():
        notify("empty caption (no caption file, folder file or file name gives any text): trained "
               "as an unconditional sample; add a .txt caption", path)
    mask_problem = None
    if mask is not None:
        reason = mask_problem_reason(mask, (width, height))
        if reason is None:
            fields["mask_path"] = mask
        else:
            mask_problem = (mask, f"{reason}; {os.path.basename(path)} trains without a mask")
    return width, height, caption.main_prompt, [tuple(t) for t in caption.tags], fields, mask_problem


def mask_problem_reason(mask: str, image_size: tuple[int, int]) -> Optional[str]:
    """Why the mask at `mask` cannot weight the loss of an image of `image_size` (as displayed), from its
    header alone, or None when it can."""
    try:
        width, height = oriented_size(mask)
    except Exception as e:  # noqa: BLE001 - as for images: any failure to read a header
        return unreadable_reason(mask, e)
    image_width, image_height = image_size
    if abs((width / height) / (image_width / image_height) - 1) > MASK_ASPECT_TOLERANCE:
        return (f"its size {width}x{height} is not the shape of its image's {image_width}x{image_height} "
                f"(aspect ratios differ by more than {MASK_ASPECT_TOLERANCE:.0%}); draw the mask on the "
                f"image as displayed, at any resolution")
    return None


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

    def __init__(self, result: ScanResult, mask_suffix: str):
        self.result = result
        self.mask_suffix = mask_suffix
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
        suffix = folder_settings.mask_suffix or self.mask_suffix
        images, masks = self._images_and_masks(listing.images, suffix)
        for image in images:
            stem = _stem(image)
            sidecars = tuple(p for p in (listing.sidecars.get((stem, ext)) for ext in SIDECAR_EXTENSIONS)
                             if p)
            self.jobs.append((image, sidecars, folder_settings, masks.pop(stem, None)))
        for stem, mask in masks.items():
            self.result.skipped.add(mask, f"a mask (its name ends in '{suffix}') without its image '{stem}.<ext>' "
                                          f"beside it; add the image, or rename the file if it is an image to "
                                          f"train (or set mask_suffix)")
        for sub in listing.subfolders:
            self.folder(sub, inherited_here)

    def _images_and_masks(self, files: list[str], suffix: str) -> tuple[list[str], dict[str, str]]:
        """The image files that are images, and {image stem: mask path} for those named `<stem><suffix>.<ext>`.
        Of two masks of one image, the first by name is used and the other reported."""
        images, masks = [], {}
        for path in files:
            stem = _stem(path)
            if not stem.endswith(suffix):
                images.append(path)
            elif stem[:-len(suffix)] in masks:
                self.result.skipped.add(path, f"a second mask of the same image; "
                                              f"{os.path.basename(masks[stem[:-len(suffix)]])} is used")
            else:
                masks[stem[:-len(suffix)]] = path
        return images, masks

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


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


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

def _scan_manifest(path: str, mask_suffix: str) -> ScanResult:
    """§2.8: a JSON array of §2.3 entries, each naming its `image`. No folder files apply. Relative
    image paths resolve against the working directory (as EveryDream2), else the manifest's folder
    (where a hand-written manifest's paths usually point)."""
    result = ScanResult(data_root=os.path.abspath(path))
    try:
        text, entries = read_manifest(path)
    except SettingsError as e:
        raise DataError(f"data_root manifest unusable: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    masks = _MasksBeside()
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
        mask = masks.beside(found, settings.mask_suffix or mask_suffix)
        # merged alone, for the ordering of tags by weight that merging gives every other source
        _add(result, found, _describe(found, merge([settings]), result.notices.add, mask))
    return result


class _MasksBeside:
    """The masks beside manifest images, from one listing of each folder (not one lookup per extension and
    image: a manifest may list 100,000 images)."""

    def __init__(self) -> None:
        self._folders: dict[str, dict[str, str]] = {}

    def beside(self, image: str, suffix: str) -> Optional[str]:
        folder = os.path.dirname(image)
        if folder not in self._folders:
            self._folders[folder] = self._masks_by_stem(folder)
        return self._folders[folder].get(_stem(image) + suffix)

    @staticmethod
    def _masks_by_stem(folder: str) -> dict[str, str]:
        """{stem: path} of the image files in `folder`; the first by name for a stem."""
        found: dict[str, str] = {}
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            return found
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                found.setdefault(stem, os.path.join(folder, name))
        return found


def _resolve(image: str, base: str) -> Optional[str]:
    for candidate in (image, os.path.join(base, image)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return None
