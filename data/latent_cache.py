"""A persistent cache of VAE latents on disk, so the VAE encodes each training image once rather than every step.

What is stored: the VAE posterior's parameters (mean and log-variance, the 8-channel `latent_dist.parameters`)
of one image as trained: its file content, bucket, crop box and flip. Training still draws a fresh posterior
sample from them every step, exactly as encoding the pixels would, so a cached step computes the same loss as
an uncached one given the same pixels and random state.

Layout: `<latent_cache_dir>/<VAE fingerprint>/<key[:2]>/<key>.safetensors`. The fingerprint hashes the VAE's
config, dtype and weights, so another base model or precision never reads these latents. The key hashes the
image file's bytes (not its path or date: a changed image gets a new key and is encoded again, a moved one is
still found), the bucket, the crop box and the flip. Entries are written atomically (a temporary file renamed
into place), so several processes may share a cache and an interrupted write leaves nothing half-written.
Stale entries (of images since changed) are never read again; delete the folder to reclaim their space.

Crops: without the cache every epoch draws a new crop of each image (crop jitter, and the offset of the
aspect trim), so no two epochs would share an entry. With the cache, each image's crop is drawn once from a
generator seeded by its content, giving one crop per image and bucket across epochs, runs and seeds; flips
still vary per epoch and each side is cached once.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from utils.run.checkpoint import atomic_file

# Bump when the pixels an entry was made from would change (decoding, crop or resize rules in data/images.py).
CACHE_VERSION = 1
TENSOR_NAME = "latent_params"
_READ_CHUNK = 1 << 20


def content_hash(path: str | Path) -> str:
    """BLAKE2b of the file's bytes: what the image is, wherever it lives and whatever its date."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def vae_fingerprint(vae) -> str:
    """A hash of the VAE's config, parameter dtype and weights (a one-off pass over ~80M values per run).

    diffusers' bookkeeping keys (`_name_or_path`, `_diffusers_version`, `_use_default_values`, ...) stay out: they
    say where the model came from, not what it computes, and `_use_default_values` is listed from a set, in an
    order that changes with every process's string hash seed."""
    digest = hashlib.blake2b(digest_size=8)
    config = {key: value for key, value in vae.config.items() if not key.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def crop_rng(content: str) -> random.Random:
    """The generator an image's cached crop is drawn from: the same for the same content, in any run."""
    return random.Random(f"latent-cache-crop:{content}")


class LatentCache:
    """The entries of one VAE. Picklable (just a folder), so DataLoader workers look entries up themselves."""

    def __init__(self, root: str | Path, vae):
        self.folder = Path(root) / vae_fingerprint(vae)

    def entry(self, content: str, bucket: tuple[int, int], box: tuple[float, ...], flip: bool) -> Path:
        described = f"v{CACHE_VERSION}|{content}|{bucket[0]}x{bucket[1]}|{','.join(map(repr, box))}|{int(flip)}"
        key = hashlib.sha256(described.encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    @staticmethod
    def load(entry: Path) -> torch.Tensor | None:
        """The entry's parameters, or None if it is missing or unreadable (then it is encoded and rewritten)."""
        try:
            # Read into memory, not memory-mapped: a file changed under a mapping would crash the process.
            return load(entry.read_bytes())[TENSOR_NAME]
        except (OSError, KeyError, SafetensorError):  # missing, or damaged on disk
            return None

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.safetensors"))


def store(entries: list[str], params: torch.Tensor) -> None:
    """Writes each image's parameters ([N, 8, h, w], any device) to its entry."""
    params = params.detach().cpu()
    for entry, one in zip(entries, params):
        with atomic_file(Path(entry)) as scratch:
            save_file({TENSOR_NAME: one.contiguous()}, str(scratch))


def collate_slots(slots: list[dict]) -> dict:
    """Batch fields of slots that are either cache hits ({"latent_params"}) or misses ({"pixels", "entry"}).

    `latent_params` holds every slot's parameters, zeros where the VAE must fill in (None when nothing hit);
    `pixel_values` the misses' pixels (absent when all hit); `latent_misses` their slots and cache entries.
    """
    hits = [s["latent_params"] for s in slots if "latent_params" in s]
    miss_slots = [i for i, s in enumerate(slots) if "latent_params" not in s]
    batch = {"latent_params": None, "latent_misses": {"slots": torch.tensor(miss_slots, dtype=torch.long),
                                                      "entries": [str(slots[i]["entry"]) for i in miss_slots]}}
    if hits:
        template = hits[0]
        batch["latent_params"] = torch.stack([s.get("latent_params", torch.zeros_like(template)) for s in slots])
    if miss_slots:
        batch["pixel_values"] = torch.stack([slots[i]["pixels"] for i in miss_slots])
    return batch
