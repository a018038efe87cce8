"""Caption text: parsing sidecar text and file names (REFERENCE §2.2), and assembling the caption a
sample is trained with, tags shuffled or drawn by weight (§2.5)."""

from __future__ import annotations

import os
import random
from typing import Optional

from data.records import Caption, Tag, join_caption


def decode_text(raw: bytes) -> str:
    """utf-8 (a BOM is dropped), else latin-1, which decodes any byte string (§2.2)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def normalize_space(text: str) -> str:
    """Runs of whitespace (newlines, tabs) as one space, ends stripped. The CLIP tokenizer collapses
    whitespace the same way, so the tokens are unchanged; doing it here keeps a caption one line in
    the batch schedule and makes `a  cat` and `a cat` the same tag when tags are merged."""
    return " ".join(text.split())


def parse_caption_text(text: str) -> Caption:
    """Split on ',': piece 1 is the main prompt, the rest are tags of weight 1. Empty tags (from
    ', ,' or a trailing comma) are dropped so they don't put stray ', ' into the caption."""
    pieces = [normalize_space(p) for p in text.split(",")]
    return Caption(pieces[0], tuple(Tag(p) for p in pieces[1:] if p))


def caption_from_filename(image_path: str) -> Caption:
    """Base name (`a.b.jpg` -> `a.b`) cut at the first '_', then parsed like a .txt, so
    `cat, sitting_02.jpg` gives main prompt `cat` and tag `sitting` (§2.2). A name that is not
    valid UTF-8 (Python holds its stray bytes as surrogates, which no tokenizer takes) is decoded
    from its bytes as caption files are."""
    base = os.path.splitext(os.path.basename(image_path))[0]
    return parse_caption_text(decode_text(os.fsencode(base)).split("_", 1)[0])


def assemble_caption(caption: Caption, shuffle: bool, keep_tags: int, max_length: int,
                     rng: Optional[random.Random]) -> str:
    """The caption text one sample is trained with (§2.5). The main prompt always comes first.

    Without shuffling: `main, tag1, tag2, ...` in merged order. With shuffling and all tag weights
    equal: the first `keep_tags` tags stay in place, the others are shuffled. With differing weights:
    tags are drawn without replacement with probability proportional to weight until the tag text
    reaches `max_length - len(main prompt)` characters (checked before each draw, so the last tag
    may overshoot); keep_tags does not apply, since the draw decides which tags appear at all.
    `rng` is only drawn from when shuffling."""
    tags = list(caption.tags)
    if shuffle and len(tags) > 1:
        if len({t.weight for t in tags}) == 1:
            rest = tags[keep_tags:]
            rng.shuffle(rest)
            tags = tags[:keep_tags] + rest
        else:
            tags = _draw_by_weight(tags, max_length - len(caption.main_prompt), rng)
    return join_caption(caption.main_prompt, [t.text for t in tags])


def _draw_by_weight(tags: list[Tag], budget: int, rng: random.Random) -> list[Tag]:
    pool, chosen, length = list(tags), [], 0
    while pool and length < budget:
        target = rng.random() * sum(t.weight for t in pool)
        i = 0
        while i < len(pool) - 1 and target >= pool[i].weight:
            target -= pool[i].weight
            i += 1
        chosen.append(pool.pop(i))
        length = len(", ".join(t.text for t in chosen))
    return chosen
