"""The records the data pipeline passes around.

`ImageRecord` is one image of the dataset with everything training needs to know about it, fixed at
start-up. It is frozen: data-loader workers receive copies, so nothing may rely on mutating one.
Fields that the first version does not read from disk yet (folder files, yaml sidecars: REFERENCE
§2.3, §2.4) are present with the defaults those files would default to, so the later readers only
fill them in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

DEFAULT_BATCH_ID = "default_batch"


class DataError(Exception):
    """A problem with the user's dataset, stated so the user can fix it (which folder or file, and
    what to do). Raised by the caller for an empty dataset and by image loading for a file that
    turned out undecodable after the scan."""


class Tag(NamedTuple):
    text: str
    weight: float = 1.0  # yaml sidecars can weight tags (§2.3); .txt/.caption/filename tags are 1.0


@dataclass(frozen=True)
class Caption:
    """A caption as its parts: the main prompt always comes first, tags may later be shuffled or
    weighted (§2.5), so they are kept apart instead of as one string."""

    main_prompt: str
    tags: tuple[Tag, ...] = ()

    def text(self) -> str:
        """`main, tag1, tag2` (REFERENCE §2.5 without shuffling); just the main prompt if no tags."""
        return ", ".join([self.main_prompt, *(t.text for t in self.tags)])

    def __str__(self) -> str:
        return self.text()


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
    flip_p: float = 0.0                        # horizontal flip probability (§2.6)
    cond_dropout: Optional[float] = None       # None: use the global cond_dropout
