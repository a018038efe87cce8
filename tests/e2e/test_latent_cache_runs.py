"""The latent cache in real runs of train.py: the losses of training with the cache, cold and warm, are those of
training without it (doc/PERFORMANCE.md)."""
from __future__ import annotations

from tests.conftest import read_scalars, short_run
from tests.test_latent_cache import write_images


def test_training_with_the_cache_gives_the_losses_of_training_without(tmp_path):
    """Images exactly their bucket's size are cropped the same way with and without the cache, so the runs
    see the same pixels: a cold cache (encoding and storing) and a warm one (reading only) must both give the
    per-step losses of a run without the cache, to the bit. (Batch 1, since the VAE's float rounding depends
    on which images it encodes together, and with a cache a batch may be part hits, part misses.)"""
    data_root = write_images(tmp_path / "exact", [(128, 128)] * 8, seed=4)
    cache_dir = tmp_path / "latents"
    common = ("--max_epochs", "2", "--flip_p", "0.5", "--seed", "11", "--batch_size", "1")
    runs = {name: short_run(tmp_path / name, data_root, *common, *extra) for name, extra in (
        ("plain", ()), ("cold", ("--cache_latents", "--latent_cache_dir", str(cache_dir))))}
    (folder,) = cache_dir.iterdir()
    written = sorted(p.stat().st_mtime_ns for p in folder.rglob("*.safetensors"))
    assert 8 <= len(written) <= 16  # every image once per flip side it was trained with
    runs["warm"] = short_run(tmp_path / "warm", data_root, *common, "--cache_latents", "--latent_cache_dir",
                             str(cache_dir))
    assert sorted(p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")) == written  # all read, none written
    assert f"Latent cache: {folder} ({len(written)} entries)" in next(runs["warm"].glob("*.log")).read_text()

    losses = {name: [v for _, v in read_scalars(run)["loss/log_step"]] for name, run in runs.items()}
    assert len(losses["plain"]) == 16
    assert losses["cold"] == losses["plain"] and losses["warm"] == losses["plain"]


def test_masked_training_with_the_cache_gives_the_losses_of_training_without(tmp_path):
    """Masks are not cached: each is cut again to the crop the cache keeps for its image. With masks on half the
    images (random grey, the others unmasked in the same batches), a cold and a warm cache give the per-step
    losses of a run without the cache, to the bit; and the masks count (a run without them trains otherwise)."""
    import numpy as np
    from PIL import Image

    data_root = write_images(tmp_path / "exact", [(64, 64)] * 8, seed=5)
    rng = np.random.default_rng(6)
    for i in range(0, 8, 2):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(data_root / f"img_{i}-masklabel.png")
    cache = ("--cache_latents", "--latent_cache_dir", str(tmp_path / "latents"))
    common = ("--resolution", "64", "--max_epochs", "2", "--flip_p", "0.5", "--seed", "11", "--batch_size", "1")
    runs = {name: short_run(tmp_path / name, data_root, *common, *extra)
            for name, extra in (("plain", ()), ("cold", cache), ("warm", cache))}
    losses = {name: [v for _, v in read_scalars(run)["loss/log_step"]] for name, run in runs.items()}
    assert len(losses["plain"]) == 16
    assert losses["cold"] == losses["plain"] and losses["warm"] == losses["plain"]

    unmasked = short_run(tmp_path / "unmasked", data_root, *common, "--masked_loss_unmasked_weight", "1")
    assert [v for _, v in read_scalars(unmasked)["loss/log_step"]] != losses["plain"]
