"""The latent cache (data/latent_cache.py) on the tiny model's real VAE and real image files: hits across epochs
and runs, a new entry whenever the image content, bucket, crop or flip changes, atomic and self-healing entries,
and training with the cache computing the very losses training without it computes."""
from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from tests.conftest import TINY_MODEL

RESOLUTION = 128


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(TINY_MODEL, subfolder="vae").eval()


@pytest.fixture(scope="module")
def tokenizer():
    from utils.model.shipped import load_tokenizer

    return load_tokenizer("sd1")


def write_images(root, sizes, seed=0):
    """Noisy RGB JPEGs of the given sizes, each with a caption."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img_{i}.jpg", quality=95)
        (root / f"img_{i}.txt").write_text(f"image {i}")
    return root


def records_of(root, resolution=RESOLUTION):
    import data

    return data.assign_buckets(data.scan(str(root)).records, resolution)


def epoch(records, tokenizer, cache, epoch_index=0, batch_size=2, **options):
    import data

    plan = data.build_epoch_batches(records, batch_size, seed=3, epoch=epoch_index)
    return list(data.make_epoch_loader(plan, records, tokenizer, cond_dropout=0.0, seed=3, epoch=epoch_index,
                                       latent_cache=cache, **options))


def misses(batches) -> int:
    return sum(len(b["latent_misses"]["entries"]) for b in batches)


def fill(vae, batches) -> None:
    """What a training step does with a batch: encode the misses (storing them) and assemble the parameters."""
    from utils.objective.step import batch_posterior

    for batch in batches:
        batch_posterior(vae, batch)


@pytest.fixture
def photos(tmp_path):
    """Four images of one bucket, larger than it and not quite its shape: without the cache every epoch would
    crop them differently."""
    return write_images(tmp_path / "photos", [(200, 150), (240, 180), (180, 135), (220, 165)])


def test_entries_hit_in_later_epochs_and_runs_and_hold_what_the_vae_gives(tmp_path, photos, vae, tokenizer):
    from data.images import load_training_image
    from data.latent_cache import LatentCache, content_hash, crop_rng
    from utils.objective.step import posterior_parameters

    records = records_of(photos)
    by_path = {record.path: record for record in records}
    cache = LatentCache(tmp_path / "cache", vae)
    first = epoch(records, tokenizer, cache, 0)
    assert misses(first) == 4 and all(b["latent_params"] is None for b in first)
    fill(vae, first)
    assert len(cache) == 4

    for run_cache, index in ((cache, 1), (LatentCache(tmp_path / "cache", vae), 7)):  # a later epoch; another run
        batches = epoch(records, tokenizer, run_cache, index, num_workers=2 if index == 7 else 0)
        assert misses(batches) == 0 and all("pixel_values" not in b for b in batches)
        for batch in batches:
            for caption, params in zip(batch["captions"], batch["latent_params"]):
                record = by_path[str(photos / f"img_{caption.split()[-1]}.jpg")]
                pixels = load_training_image(record.path, record.bucket, crop_rng(content_hash(record.path)))
                # Encoded alone rather than in its batch: equal up to float rounding.
                torch.testing.assert_close(params, posterior_parameters(vae, pixels[None])[0], rtol=1e-4, atol=1e-5)


def test_changed_content_bucket_crop_and_flip_each_make_a_new_entry(tmp_path, photos, vae, tokenizer):
    from data.latent_cache import LatentCache, content_hash

    records = records_of(photos)
    cache = LatentCache(tmp_path / "cache", vae)
    fill(vae, epoch(records, tokenizer, cache))
    assert misses(epoch(records, tokenizer, cache, 1)) == 0

    # Content: one image repainted under the same name; only it is encoded again, under a new key.
    changed = photos / "img_2.jpg"
    before = content_hash(changed)
    Image.new("RGB", (180, 135), (10, 200, 30)).save(changed, quality=95)
    assert content_hash(changed) != before
    batches = epoch(records, tokenizer, cache, 2)
    assert misses(batches) == 1
    fill(vae, batches)
    assert len(cache) == 5 and misses(epoch(records, tokenizer, cache, 3)) == 0

    # Bucket: the same files at another resolution land in other buckets.
    other = records_of(photos, 192)
    assert all(a.bucket != b.bucket for a, b in zip(records, other))
    assert misses(epoch(other, tokenizer, cache)) == 4

    # Flip: every image mirrored is a new entry, then found from the next epoch on.
    flipped = epoch(records, tokenizer, cache, 4, flip_p=1.0)
    assert misses(flipped) == 4
    fill(vae, flipped)
    assert misses(epoch(records, tokenizer, cache, 5, flip_p=1.0)) == 0

    # Crop: without jitter the crop of these oversized images is another box, so another entry.
    assert misses(epoch(records, tokenizer, cache, 6, crop_jitter=False)) == 4

    # The key itself: any one part changed gives another file.
    base = ("ab" * 20, (128, 96), (0.0, 1.5, 200.0, 151.5), False)
    variants = [("cd" * 20, *base[1:]), (base[0], (96, 128), *base[2:]), (*base[:2], (0.0, 2.5, 200.0, 152.5), False),
                (*base[:3], True)]
    assert len({cache.entry(*base), *(cache.entry(*v) for v in variants)}) == 5


def test_another_vae_or_precision_never_reads_these_latents(tmp_path, vae):
    from data.latent_cache import LatentCache

    other = type(vae).from_config(vae.config)
    other.load_state_dict(vae.state_dict())
    assert LatentCache(tmp_path, other).folder == LatentCache(tmp_path, vae).folder
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    in_fp32 = LatentCache(tmp_path, other).folder
    assert in_fp32 != LatentCache(tmp_path, vae).folder
    assert LatentCache(tmp_path, other.to(torch.bfloat16)).folder != in_fp32


def test_the_same_vae_finds_its_latents_in_every_process_and_from_any_folder(tmp_path):
    """An older VAE config (as SD1.5's) lacks keys that diffusers then fills with defaults and lists in
    `_use_default_values`, in an order set by the process's string hash seed. The fingerprint must not depend on
    it, or every run and every process of a multi-GPU run would encode all images again in a folder of its own."""
    import json
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO

    folders = []
    for copy in ("a", "b"):
        shutil.copytree(TINY_MODEL / "vae", tmp_path / copy)
        folders.append(tmp_path / copy)
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())
        for key in ("latents_mean", "latents_std", "shift_factor", "mid_block_add_attention", "use_quant_conv",
                    "use_post_quant_conv", "force_upcast"):
            del config[key]
        (folder / "config.json").write_text(json.dumps(config))
    script = ("import sys; from diffusers import AutoencoderKL; from data.latent_cache import LatentCache; "
              "vae = AutoencoderKL.from_pretrained(sys.argv[1]); "
              "print(len(vae.config._use_default_values), ','.join(vae.config._use_default_values)); "
              "print(LatentCache('cache', vae).folder.name)")
    processes = [subprocess.Popen([sys.executable, "-c", script, str(folder)], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env={"PYTHONHASHSEED": hash_seed, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
                 for folder, hash_seed in zip(folders, ("1", "2"))]  # side by side: most of their time is imports
    outputs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]
        outputs.append(stdout.split())
    (count_a, order_a, folder_a), (count_b, order_b, folder_b) = outputs
    assert int(count_a) == int(count_b) == 7
    assert order_a != order_b  # the hash seeds do list the defaults in another order
    assert folder_a == folder_b


def test_entries_are_written_whole_and_a_damaged_one_is_encoded_again(tmp_path, photos, vae, tokenizer):
    from data.latent_cache import LatentCache

    records = records_of(photos)
    cache = LatentCache(tmp_path / "cache", vae)
    fill(vae, epoch(records, tokenizer, cache))
    entries = sorted(cache.folder.rglob("*.safetensors"))
    assert len(entries) == 4 and not list(cache.folder.rglob("*.partial"))
    good = LatentCache.load(entries[0])

    entries[0].write_bytes(entries[0].read_bytes()[:100])  # e.g. a disk that filled up under another tool
    (entries[1].parent / (entries[1].name + ".partial")).write_bytes(b"half")  # a write cut short: never read
    batches = epoch(records, tokenizer, cache, 1)
    assert [str(entries[0])] == [e for b in batches for e in b["latent_misses"]["entries"]]
    fill(vae, batches)
    torch.testing.assert_close(LatentCache.load(entries[0]), good, rtol=1e-4, atol=1e-5)  # now encoded alone
    assert misses(epoch(records, tokenizer, cache, 2)) == 0


@pytest.mark.parametrize("size, orientation", [((900, 600), 1), ((600, 900), 6), ((300, 200), 8)])
def test_header_crop_is_the_crop_the_decoder_uses(tmp_path, size, orientation):
    """The cache keys on the box read from the header; it must be the box the pixels are cut with (JPEG draft
    scale for large files, EXIF rotation)."""
    import numpy as np

    from data.images import _DRAFT_MARGIN, load_training_image, open_oriented_rgb, to_tensor, training_crop

    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90, exif=exif)
    bucket = (192, 128)
    box = training_crop(str(path), bucket, random.Random(5)).box
    image = open_oriented_rgb(str(path), min_size=(_DRAFT_MARGIN * bucket[0], _DRAFT_MARGIN * bucket[1]))
    expected = to_tensor(image.resize(bucket, box=box).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert torch.equal(load_training_image(str(path), bucket, random.Random(5), flip=True), expected)


def test_the_unet_gets_one_layout_whether_latents_come_from_the_vae_or_the_cache(tmp_path, photos, tokenizer):
    """A compiled UNet compiles again for each input layout it meets (minutes for SD's), so the cache-filling epoch
    (latents from the VAE, whose convolutions may hand back channels-last tensors) and the epochs that read the
    cache must hand it the same one: contiguous, as the sampler's latents are."""
    from data.latent_cache import LatentCache
    from utils.model import models
    from utils.objective.step import StepSettings, compute_loss

    model = models.load(TINY_MODEL)
    cache = LatentCache(tmp_path / "cache", model.vae)
    settings = StepSettings(loss_type="mse", zero_frequency_noise_ratio=0.0, timestep_start=0, timestep_end=1000,
                            batch_size=2, pyramid_noise_discount=None, embedding_perturbation=0.0, min_snr_gamma=None,
                            clip_skip=0)
    inputs = []
    model.unet.register_forward_pre_hook(lambda unet, args: inputs.append(args[0]))
    records = records_of(photos)
    for index in (0, 1):
        batches = epoch(records, tokenizer, cache, index)
        assert misses(batches) == (4 if index == 0 else 0)
        for batch in batches:
            with torch.no_grad():
                compute_loss(model.unet, model.text_encoder, model.vae, model.noise_scheduler("ddpm"), batch, settings)
    assert len(inputs) == 4 and all(latents.is_contiguous() for latents in inputs)
