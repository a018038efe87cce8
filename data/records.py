"""The records the data pipeline passes around.

`ImageRecord` is one image of the dataset with everything training needs to know about it, fixed at
start-up from its caption files, folder files and manifest entry (REFERENCE §2.2-§2.4, §2.8). It is
frozen: data-loader workers receive copies, so nothing may rely on mutating one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

DEFAULT_BATCH_ID = "default_batch"
# §2.3: the tag-text budget of weighted tag shuffling when no file sets max_caption_length.
DEFAULT_MAX_CAPTION_LENGTH = 2048


class DataError(Exception):
    """A problem with the user's dataset, stated so the user can fix it (which folder or file, and
    what to do). Raised for a dataset that cannot train at all (no usable image, no data_root);
    problems with single files are reported and the file is skipped instead."""


class Tag(NamedTuple):
    text: str
    weight: float = 1.0  # yaml/json sidecars can weight tags (§2.3); .txt/.caption/filename tags are 1.0


@dataclass(frozen=True)
class Caption:
    """A caption as its parts: the main prompt always comes first, tags may be shuffled or drawn by
    weight each epoch (§2.5), so they are kept apart instead of as one string."""

    main_prompt: str
    tags: tuple[Tag, ...] = ()

    def text(self) -> str:
        """`main, tag1, tag2` (REFERENCE §2.5 without shuffling). An empty main prompt (a file named
        `_01.jpg` with a tags-only sidecar) is left out rather than leaving a leading ', '."""
        return join_caption(self.main_prompt, [t.text for t in self.tags])

    def __str__(self) -> str:
        return self.text()


def join_caption(main_prompt: str, tags: list[str]) -> str:
    return ", ".join(part for part in (main_prompt, *tags) if part)


@dataclass(frozen=True)
class ImageRecord:
    path: str                # absolute path of the image file
    caption: Caption
    width: int               # size from the file header, after EXIF orientation (§3.2)
    height: int
    bucket: Optional[tuple[int, int]] = None   # (width, height); set by buckets.assign_buckets
    multiply: float = 1.0                      # repeats per epoch (§2.6)
    batch_id: str = DEFAULT_BATCH_ID           # named batch group (§3.4)
    loss_scale: float = 1.0                    # per-sample loss multiplier (§2.6, §8.5)
    flip_p: Optional[float] = None             # None: use the global flip_p
    cond_dropout: Optional[float] = None       # None: use the global cond_dropout
    shuffle_tags: bool = False                 # shuffle this image's tags even without --shuffle_tags
    rating: float = 1.0                        # importance for rated_dataset and multiply sweeps (§2.7)
    max_caption_length: int = DEFAULT_MAX_CAPTION_LENGTH
    # The image's loss mask (doc/DATA.md, Masks), checked at scan time. Left out of the repr, which the resume
    # fingerprint hashes, so that records without a mask fingerprint as they did before masks existed.
    mask_path: Optional[str] = field(default=None, repr=False)


def without_path(message: str, path: str) -> str:
    """`message` without a leading "<path>: " or "<path> ": the skipped-file summary names the file
    already, and the message (written to name it when it stands alone) need not say it twice."""
    for prefix in (f"{path}: ", f"{path} "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


class SkippedFiles:
    """Files left out of training, each with its reason; a file is reported once however often it
    is met (a broken image is met again every epoch, in whichever worker decodes it)."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}

    def add(self, path: str, reason: str) -> bool:
        """Record `path`; True (and nothing else happens) the first time, False after."""
        if path in self._reasons:
            return False
        self._reasons[path] = reason
        return True

    def items(self) -> list[tuple[str, str]]:
        return list(self._reasons.items())

    def __len__(self) -> int:
        return len(self._reasons)

    def __contains__(self, path: str) -> bool:
        return path in self._reasons
