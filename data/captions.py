"""Per-image captions from sidecar files and file names (REFERENCE §2.2, first version).

Read for image `dir/base.ext`: `dir/base.txt`, then `dir/base.caption`. The yaml sidecars and the
folder-level files of §2.3/§2.4 come later; they merge the same way (`_merge`), so adding them means
adding sources to the list in `caption_for_image`, not changing how captions are combined.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

from data.records import Caption, Tag

log = logging.getLogger(__name__)

# Sidecars in reading order; a later one wins the main prompt (§2.2).
TEXT_SIDECAR_EXTENSIONS = (".txt", ".caption")


def decode_text(raw: bytes) -> str:
    """utf-8 (a BOM is dropped), else latin-1, which decodes any byte string (§2.2)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_text(path: str) -> str:
    with open(path, "rb") as f:
        return decode_text(f.read())


def parse_caption_text(text: str) -> Caption:
    """Split on ',' and strip each piece: piece 1 is the main prompt, the rest are tags of weight 1.
    Empty tags (from ', ,' or a trailing comma) are dropped so they don't put stray ', ' into the
    caption; newlines inside a piece are kept as whitespace like any other character."""
    pieces = [p.strip() for p in text.split(",")]
    return Caption(pieces[0], tuple(Tag(p) for p in pieces[1:] if p))


def caption_from_filename(image_path: str) -> Caption:
    """Base name (`a.b.jpg` -> `a.b`) cut at the first '_', then parsed like a .txt, so
    `cat, sitting_02.jpg` gives main prompt `cat` and tag `sitting` (§2.2)."""
    base = os.path.splitext(os.path.basename(image_path))[0]
    return parse_caption_text(base.split("_", 1)[0])


def _read_text_sidecar(path: str) -> Caption:
    text = read_text(path)
    # (compat) EveryDream2: if the whole text names an existing caption file, that file is parsed
    # instead. One level only, and only for .txt/.caption targets (a yaml target needs the yaml
    # reader of the later issue; until then such text is taken as a caption literally).
    target = text.strip()
    if target.lower().endswith(TEXT_SIDECAR_EXTENSIONS) and os.path.isfile(target):
        text = read_text(target)
    return parse_caption_text(text)


def _merge(sources: Iterable[Caption]) -> Caption:
    """Merge captions given from least to most specific (§2.4): the most specific non-empty main
    prompt wins; tags are the union, most specific source first, exact duplicates collapsed, then
    stably sorted by weight (highest first)."""
    sources = list(sources)
    main = ""
    for c in sources:
        if c.main_prompt:
            if main and main != c.main_prompt:
                log.debug("main prompt %r overrides %r", c.main_prompt, main)
            main = c.main_prompt
    tags: list[Tag] = []
    for c in reversed(sources):
        tags.extend(t for t in c.tags if t not in tags)
    tags.sort(key=lambda t: -t.weight)
    return Caption(main, tuple(tags))


def caption_for_image(image_path: str) -> Caption:
    """The caption of one image: its sidecars merged, else (no main prompt anywhere) the file name.

    A sidecar that exists but cannot be read raises OSError; the scan reports it for that image.
    """
    stem = os.path.splitext(image_path)[0]
    sources: list[Caption] = []
    for ext in TEXT_SIDECAR_EXTENSIONS:
        sidecar = stem + ext
        if os.path.isfile(sidecar):
            sources.append(_read_text_sidecar(sidecar))
    caption = _merge(sources)
    if not caption.main_prompt:
        # Filename fallback (§2.2): only when no main prompt exists after merging. Its own tags
        # join the sidecars' tags as the least specific source.
        caption = _merge([caption_from_filename(image_path), caption])
    return caption
