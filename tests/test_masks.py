"""Masked training (doc/DATA.md, Masks): the loss weights against their formula, masks following their images
through crop, resize, flip, bucket, the latent cache and process shares, what the scan makes of mask files, bad
masks, and validation weighing by masks as training does.

Real files written with PIL and the real data pipeline; nothing of ours is mocked.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data.batching import process_share
from data.latent_cache import LatentCache
from tests.conftest import TINY_MODEL
from utils.objective.objectives import diffusion_loss, mask_weights, per_sample_mean

LOSS_TYPES = ("mse", "huber", "mse_huber", "huber_mse")


@pytest.fixture(scope="module")
def tokenizer():
    from utils.model.shipped import load_tokenizer

    return load_tokenizer("sd1")


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(TINY_MODEL, subfolder="vae").eval()


def save(path, pixels: np.ndarray, **save_kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **save_kwargs)
    return path


def left_half_white(size) -> np.ndarray:
    w, h = size
    mask = np.zeros((h, w), np.uint8)
    mask[:, :w // 2] = 255
    return mask


def image_carrying_its_mask(folder, name, size, seed, mask_size=None, **save_kwargs):
    """`name.png` whose red channel is a random grey pattern and `name-masklabel.png`, that pattern as the mask
    (resized to `mask_size` if given). Cut, resized and flipped as the image is, a mask at the image's size equals
    the red channel of the image the loader gives, value for value."""
    w, h = size
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, 256, (h, w), dtype=np.uint8)
    save(folder / f"{name}.png", np.dstack([pattern, rng.integers(0, 256, (h, w, 2), dtype=np.uint8)]),
         **save_kwargs)
    mask = Image.fromarray(pattern)
    if mask_size:
        mask = mask.resize(mask_size)
    mask.save(folder / f"{name}-masklabel.png")


def red_channel(pixels: torch.Tensor) -> torch.Tensor:
    """The uint8 red channel back from the loader's [-1, 1] pixels."""
    return ((pixels[0] + 1) * 127.5).round().to(torch.uint8)


def loader(records, tokenizer, epoch, batch_size=2, **options):
    plan = data.build_epoch_batches(records, batch_size, seed=3, epoch=epoch)
    return plan, data.make_epoch_loader(plan, records, tokenizer, cond_dropout=0.0, seed=3, epoch=epoch, **options)


def records_of(root, resolution=64, **scan_options):
    result = data.scan(str(root), **scan_options)
    return data.assign_buckets(result.records, resolution), result


# ---------------------------------------------------------------- the loss weights

def loss_pair(shape=(3, 4, 8, 8), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def random_masks(n=3, size=64, seed=1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), generator=generator, dtype=torch.uint8)


@pytest.mark.parametrize("unmasked_weight", [0.0, 0.25])
def test_each_images_loss_is_the_sum_of_weight_times_loss_over_the_sum_of_weights(unmasked_weight):
    pred, target = loss_pair()
    masks = random_masks()
    masks[1, :, :, 32:] = 0  # one image half black
    latents = torch.zeros(3, 4, 8, 8)
    # By hand: each 8x8 block of pixels averaged, then weighted between unmasked_weight and 1.
    blocks = (masks.double() / 255).reshape(3, 1, 8, 8, 8, 8).mean(dim=(3, 5))
    weights = (unmasked_weight + (1 - unmasked_weight) * blocks).expand(3, 4, 8, 8)
    loss_map = (pred.double() - target.double()) ** 2
    expected = (weights * loss_map).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3))

    got = mask_weights(masks, latents, unmasked_weight)
    assert got.shape == (3, 1, 8, 8)
    torch.testing.assert_close(got.double(), weights[:, :1], rtol=0, atol=1e-6)
    torch.testing.assert_close(per_sample_mean(loss_map.float(), got).double(), expected, rtol=1e-5, atol=0)
    loss_scale = torch.tensor([1.0, 0.5, 2.0])  # min-SNR weights and loss_scale multiply the masked loss
    torch.testing.assert_close(diffusion_loss(pred, target, torch.zeros(3), "mse", loss_scale, weights=got).double(),
                               (expected * loss_scale.double()).mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_white_mask_or_unmasked_weight_1_gives_todays_loss_bit_for_bit(loss_type):
    pred, target = loss_pair()
    timesteps, loss_scale = torch.tensor([5, 500, 999]), torch.tensor([0.3, 1.0, 2.5])
    latents = torch.zeros(3, 4, 8, 8)
    today = diffusion_loss(pred, target, timesteps, loss_type, loss_scale)
    white = torch.full((3, 1, 64, 64), 255, dtype=torch.uint8)
    assert torch.equal(diffusion_loss(pred, target, timesteps, loss_type, loss_scale,
                                      weights=mask_weights(white, latents, 0.0)), today)
    assert torch.equal(diffusion_loss(pred, target, timesteps, loss_type, loss_scale,
                                      weights=mask_weights(random_masks(), latents, 1.0)), today)


def test_images_without_a_mask_keep_their_loss_in_a_batch_with_masked_ones():
    """The loader gives an image without a mask a white one when others of its batch have masks."""
    pred, target = loss_pair()
    masks = random_masks()
    masks[0] = masks[2] = 255
    loss_map = (pred - target) ** 2
    weighted = per_sample_mean(loss_map, mask_weights(masks, torch.zeros(3, 4, 8, 8), 0.0))
    plain = per_sample_mean(loss_map)
    assert torch.equal(weighted[[0, 2]], plain[[0, 2]]) and not torch.equal(weighted[1], plain[1])


def test_an_all_black_mask_counts_nothing_and_keeps_gradients_finite():
    pred, target = loss_pair()
    pred.requires_grad_(True)
    masks = random_masks()
    masks[1] = 0
    per_sample = per_sample_mean((pred - target) ** 2, mask_weights(masks, torch.zeros(3, 4, 8, 8), 0.0))
    assert per_sample[1] == 0 and per_sample[[0, 2]].gt(0).all()
    per_sample.sum().backward()
    assert pred.grad.isfinite().all() and pred.grad[1].eq(0).all() and pred.grad[0].ne(0).any()


# ---------------------------------------------------------------- masks follow their images

def test_masks_follow_the_crop_resize_flip_and_bucket_of_their_image(tmp_path, tokenizer):
    """Oversized images of three shapes (random crop jitter and offset each epoch), one exactly its bucket's size,
    one stored rotated with an EXIF orientation (its mask drawn upright, as the image is displayed), every sample
    flipped or not at random: the mask the loader gives is the image's own red channel, value for value."""
    root = tmp_path / "images"
    image_carrying_its_mask(root, "wide", (200, 120), 1)
    image_carrying_its_mask(root, "tall", (120, 200), 2)
    image_carrying_its_mask(root, "square", (150, 150), 3)
    image_carrying_its_mask(root, "exact", (64, 64), 4)
    rotated = np.random.default_rng(5).integers(0, 256, (90, 160, 3), dtype=np.uint8)  # stored 160x90
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: 90x160
    save(root / "rotated.png", rotated, exif=exif)
    Image.fromarray(np.ascontiguousarray(np.rot90(rotated[:, :, 0], k=-1))).save(root / "rotated-masklabel.png")
    records, _ = records_of(root)
    assert len(records) == 5 and all(r.mask_path for r in records)
    assert len({r.bucket for r in records}) == 3

    flips = set()
    for epoch in range(3):
        plan, batches = loader(records, tokenizer, epoch, batch_size=1, flip_p=0.5)
        for step, batch in enumerate(batches):
            assert batch["loss_mask"].dtype == torch.uint8 and batch["loss_mask"].shape[1] == 1
            assert torch.equal(batch["loss_mask"][0, 0], red_channel(batch["pixel_values"][0]))
            flips.add(batches.dataset.sample(step, 0, plan[step].indices[0])[1])
    assert flips == {True, False}


def test_a_mask_of_another_resolution_covers_the_same_picture(tmp_path, tokenizer):
    root = tmp_path / "images"
    image_carrying_its_mask(root, "photo", (200, 120), 1, mask_size=(100, 60))
    records, _ = records_of(root)
    for epoch in range(3):
        for batch in loader(records, tokenizer, epoch, batch_size=1, flip_p=0.5)[1]:
            mask, red = batch["loss_mask"][0, 0].flatten(), red_channel(batch["pixel_values"][0]).flatten()
            # Half the resolution blurs the random pattern; cut from another place, it would not correlate at all.
            assert np.corrcoef(mask, red)[0, 1] > 0.5


def test_the_latent_mask_of_a_flipped_sample_is_the_mirror_image(tmp_path, tokenizer):
    """Images drawn with their left half white in the mask: at latent resolution the weights are 1 on the left
    half and 0 on the right, mirrored exactly for the samples the loader flips."""
    root = tmp_path / "images"
    for n in range(4):
        save(root / f"img_{n}.png", np.random.default_rng(n).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        save(root / f"img_{n}-masklabel.png", left_half_white((64, 64)))
    records, _ = records_of(root)
    latents = torch.zeros(2, 4, 8, 8)
    left = torch.zeros(1, 8, 8)
    left[..., :4] = 1
    flips = []
    for epoch in range(3):
        plan, batches = loader(records, tokenizer, epoch, flip_p=0.5)
        for step, batch in enumerate(batches):
            weights = mask_weights(batch["loss_mask"], latents, 0.0)
            for slot, index in enumerate(plan[step].indices):
                flip = batches.dataset.sample(step, slot, index)[1]
                assert torch.equal(weights[slot], left.flip(-1) if flip else left)
                flips.append(flip)
    assert set(flips) == {True, False}


def test_with_the_latent_cache_masks_are_cut_where_the_cached_crop_is(tmp_path, tokenizer, vae):
    """The latent cache keeps one crop per image (drawn from its content, not per sample): an encoded miss's
    mask is cut there too, and a hit's mask is the same as the miss's of the same flip."""
    from utils.objective.step import batch_posterior

    root = tmp_path / "images"
    for n, size in enumerate([(200, 120), (150, 150), (180, 120)]):
        image_carrying_its_mask(root, f"img_{n}", size, n)
    records, _ = records_of(root)
    cache = LatentCache(tmp_path / "cache", vae)
    masks_of_misses = {}
    for epoch in range(3):
        plan, batches = loader(records, tokenizer, epoch, batch_size=1, flip_p=0.5, latent_cache=cache)
        for step, batch in enumerate(batches):
            key = (plan[step].indices[0], batches.dataset.sample(step, 0, plan[step].indices[0])[1])
            if "pixel_values" in batch:
                assert torch.equal(batch["loss_mask"][0, 0], red_channel(batch["pixel_values"][0]))
                masks_of_misses[key] = batch["loss_mask"]
                batch_posterior(vae, batch)
            else:
                assert torch.equal(batch["loss_mask"], masks_of_misses[key])
    assert len(cache) == len(masks_of_misses) < 9  # some samples were hits


def test_batches_without_masks_are_as_before_and_unmasked_slots_are_white(tmp_path, tokenizer):
    root = tmp_path / "images"
    for n in range(4):
        save(root / f"img_{n}.png", np.random.default_rng(n).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    plain, _ = records_of(root)
    assert not any("loss_mask" in batch for batch in loader(plain, tokenizer, 0)[1])
    save(root / "img_2-masklabel.png", left_half_white((64, 64)))
    records, _ = records_of(root)
    seen_mixed = False
    for epoch in range(3):
        plan, batches = loader(records, tokenizer, epoch)
        for step, batch in enumerate(batches):
            masked = [records[i].mask_path is not None for i in plan[step].indices]
            assert ("loss_mask" in batch) == any(masked)
            for slot, has_mask in enumerate(masked if any(masked) else ()):
                assert batch["loss_mask"][slot].eq(255).all() != has_mask
            seen_mixed |= any(masked) and not all(masked)
    assert seen_mixed


def test_each_process_share_carries_the_masks_of_its_own_slots(tmp_path, tokenizer):
    """With several processes each loads its slots of the global batch: its masks are those rows of the global
    batch's, and a share without any masked image has no loss_mask (its rows are white in the global batch)."""
    root = tmp_path / "images"
    for n in range(8):
        save(root / f"img_{n}.png", np.random.default_rng(n).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        if n % 3 == 0:
            save(root / f"img_{n}-masklabel.png", np.random.default_rng(10 + n).integers(0, 256, (64, 64),
                                                                                         dtype=np.uint8))
    records, _ = records_of(root)
    plan = data.build_epoch_batches(records, 4, seed=3, epoch=0)

    def batches(share):
        return list(data.make_epoch_loader(share, records, tokenizer, cond_dropout=0.0, seed=3, epoch=0, flip_p=0.5))

    whole = batches(plan)
    for rank in range(2):
        for global_batch, own in zip(whole, batches(process_share(plan, rank, 2))):
            rows = global_batch["loss_mask"][2 * rank:2 * rank + 2] if "loss_mask" in global_batch else None
            if "loss_mask" in own:
                assert torch.equal(own["loss_mask"], rows)
            else:
                assert rows is None or rows.eq(255).all()


# ---------------------------------------------------------------- which files are masks

def test_masks_pair_with_their_images_and_orphans_are_reported(tmp_path):
    root = tmp_path / "images"
    pixels = np.zeros((32, 32, 3), np.uint8)
    save(root / "a.png", pixels)
    save(root / "a-masklabel.png", left_half_white((16, 16)))  # a mask may have another resolution
    save(root / "b.JPG", pixels)
    save(root / "b-masklabel.PNG", left_half_white((32, 32)))
    save(root / "b-masklabel.webp", left_half_white((32, 32)))  # a second mask of b
    save(root / "c-masklabel.png", left_half_white((32, 32)))  # no image c
    save(root / "d.png", pixels)
    records, result = records_of(root)
    masks = {r.path.rsplit("/", 1)[1]: r.mask_path and r.mask_path.rsplit("/", 1)[1] for r in records}
    assert masks == {"a.png": "a-masklabel.png", "b.JPG": "b-masklabel.PNG", "d.png": None}
    problems = dict(result.problems)
    assert set(problems) == {str(root / "b-masklabel.webp"), str(root / "c-masklabel.png")}
    assert "second mask of the same image; b-masklabel.PNG is used" in problems[str(root / "b-masklabel.webp")]
    assert "without its image 'c.<ext>'" in problems[str(root / "c-masklabel.png")]


def test_mask_suffix_from_the_flag_global_yaml_and_local_yaml(tmp_path):
    root = tmp_path / "images"
    pixels = np.zeros((32, 32, 3), np.uint8)
    mask = left_half_white((32, 32))
    for path in ("top.png", "top_m.png", "sub/x.png", "sub/x_m.png", "other/y.png", "other/y.alpha.png"):
        save(root / path, mask if "_m." in path or ".alpha" in path else pixels)
    (root / "global.yaml").write_text("mask_suffix: _m\n")
    (root / "other").joinpath("local.yaml").write_text("mask_suffix: .alpha\n")
    (root / "sub" / "x.yaml").write_text("mask_suffix: -nope\n")  # an image's own file cannot name it
    records, result = records_of(root, mask_suffix="-unused")
    assert {r.path: r.mask_path for r in records} == {
        str(root / "top.png"): str(root / "top_m.png"), str(root / "sub" / "x.png"): str(root / "sub" / "x_m.png"),
        str(root / "other" / "y.png"): str(root / "other" / "y.alpha.png")}
    assert any("mask_suffix names the masks of a whole folder" in line and "x.yaml" in line
               for line in result.summary_lines())

    (root / "global.yaml").unlink()
    records, _ = records_of(root, mask_suffix="_m")  # the flag's suffix where no folder file names one
    assert {r.path: r.mask_path for r in records}[str(root / "top.png")] == str(root / "top_m.png")


@pytest.mark.parametrize("value", ['""', "a/b", "3"])
def test_a_bad_mask_suffix_in_a_folder_file_is_reported_and_the_file_ignored(tmp_path, value):
    root = tmp_path / "images"
    save(root / "a.png", np.zeros((32, 32, 3), np.uint8))
    save(root / "a-masklabel.png", left_half_white((32, 32)))
    (root / "local.yaml").write_text(f"mask_suffix: {value}\n")
    records, result = records_of(root)
    assert records[0].mask_path == str(root / "a-masklabel.png")  # local.yaml ignored: the default suffix
    (path, reason), = result.problems
    assert path == str(root / "local.yaml") and "mask_suffix" in reason


@pytest.mark.parametrize("value, says", [("", "must not be empty"), ("masks/x", "path separator")])
def test_a_bad_mask_suffix_flag_stops_the_run_before_it_starts(tmp_path, value, says):
    from utils.options import config

    (tmp_path / "data").mkdir()
    with pytest.raises(config.ConfigError, match=f"mask_suffix.*{says}"):
        config.load(["--resume_ckpt", str(TINY_MODEL), "--data_root", str(tmp_path / "data"), "--mask_suffix", value])


def test_manifest_images_find_their_masks_beside_them(tmp_path):
    import json

    save(tmp_path / "imgs" / "a.png", np.zeros((32, 32, 3), np.uint8))
    save(tmp_path / "imgs" / "a-masklabel.png", left_half_white((32, 32)))
    save(tmp_path / "imgs" / "b.png", np.zeros((32, 32, 3), np.uint8))
    save(tmp_path / "imgs" / "b_m.png", left_half_white((32, 32)))
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps([{"image": "imgs/a.png"}, {"image": "imgs/b.png", "mask_suffix": "_m"}]))
    records, _ = records_of(manifest)
    assert [r.mask_path for r in records] == [str(tmp_path / "imgs" / "a-masklabel.png"),
                                             str(tmp_path / "imgs" / "b_m.png")]


def test_adding_a_mask_is_a_change_of_the_data_for_resuming_and_no_mask_changes_nothing(tmp_path):
    """A resumable checkpoint continues only the same data; records without masks fingerprint as they did before
    masks existed, so checkpoints saved then still continue."""
    import hashlib
    from types import SimpleNamespace

    from utils.run import training_state

    root = tmp_path / "images"
    for n in range(2):
        save(root / f"img_{n}.png", np.zeros((64, 64, 3), np.uint8))
    args = SimpleNamespace(batch_size=2, grad_accum=1, seed=5, resolution=64, cache_latents=False)
    records, _ = records_of(root)
    before = training_state.fingerprint(args, records, 1, ["unet"])
    assert before["data"] == hashlib.sha256("".join(map(repr, records)).encode()).hexdigest()
    save(root / "img_1-masklabel.png", left_half_white((64, 64)))
    masked, _ = records_of(root)
    assert training_state.differences(before, training_state.fingerprint(args, masked, 1, ["unet"])) == [
        "the training data (images, captions or their settings) changed"]


# ---------------------------------------------------------------- bad masks

def test_bad_masks_leave_their_image_to_train_without_one(tmp_path, tokenizer, caplog):
    """Unreadable and misshapen masks are found by the scan, a mask whose data is cut off when it is first
    decoded: each is reported once, by name and why, and its image trains with a white mask (no mask)."""
    root = tmp_path / "images"
    noise = np.random.default_rng(0)
    for name in ("corrupt", "misshapen", "nearly", "truncated", "good"):
        save(root / f"{name}.png", noise.integers(0, 256, (100, 100, 3), dtype=np.uint8))
    (root / "corrupt-masklabel.png").write_bytes(b"not an image at all")
    save(root / "misshapen-masklabel.png", left_half_white((100, 90)))  # 10% off: not the image's shape
    save(root / "nearly-masklabel.png", left_half_white((199, 200)))  # 0.5% off: rounding, fine
    save(root / "truncated-masklabel.png", noise.integers(0, 256, (100, 100), dtype=np.uint8))
    cut = root / "truncated-masklabel.png"
    cut.write_bytes(cut.read_bytes()[:2000])  # the header is intact
    save(root / "good-masklabel.png", left_half_white((100, 100)))
    records, result = records_of(root)
    masks = {r.path.rsplit("/", 1)[1]: r.mask_path is not None for r in records}
    assert masks == {"corrupt.png": False, "misshapen.png": False, "nearly.png": True, "truncated.png": True,
                     "good.png": True}
    problems = dict(result.problems)
    assert "not a readable image" in problems[str(root / "corrupt-masklabel.png")]
    assert "its size 100x90 is not the shape of its image's 100x100" in problems[str(root / "misshapen-masklabel.png")]
    assert all(reason.endswith("trains without a mask") for reason in problems.values())

    caplog.set_level(logging.WARNING)
    truncated = next(n for n, r in enumerate(records) if r.path.endswith("truncated.png"))
    for epoch in range(2):
        plan, batches = loader(records, tokenizer, epoch, batch_size=1, skipped=result.skipped)
        for step, batch in enumerate(batches):
            if plan[step].indices[0] == truncated:
                assert "loss_mask" not in batch  # as an image without a mask
    reported = [r.message for r in caplog.records if str(cut) in r.message]
    assert len(reported) == 1 and "cannot decode the mask" in reported[0]
    assert reported[0].endswith("its image trains without a mask")
    assert str(cut) in dict(result.problems)


# ---------------------------------------------------------------- validation

def test_validation_weighs_each_image_by_its_mask_as_training_does(tmp_path, tokenizer):
    """A white mask, or masked_loss_unmasked_weight 1, validates exactly as no mask; a half mask does not."""
    import contextlib
    import json

    from utils.model import models
    from utils.objective.step import StepSettings
    from utils.watch.validation import Validator, load_validation_config, split_records

    model = models.load(TINY_MODEL)
    root = tmp_path / "val"
    for n in range(3):
        save(root / f"img_{n}.png", np.random.default_rng(n).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        (root / f"img_{n}.txt").write_text("a thing")
    cfg_path = tmp_path / "v.json"
    cfg_path.write_text(json.dumps({"validate_training": False, "extra_manual_datasets": {"masked": str(root)},
                                    "batch_size": 2}))
    cfg = load_validation_config(cfg_path)
    settings = StepSettings(loss_type="mse", zero_frequency_noise_ratio=0.0, timestep_start=0, timestep_end=1000,
                            batch_size=2, pyramid_noise_discount=None, embedding_perturbation=0.0,
                            min_snr_gamma=None, clip_skip=0)

    def val_loss(unmasked_weight=0.0):
        _, sets = split_records([], cfg, 64)
        validator = Validator(cfg, sets, dataclasses.replace(settings, masked_loss_unmasked_weight=unmasked_weight))
        return validator.run(model.unet, model.text_encoder, model.vae, model.noise_scheduler("ddpm"),
                             model.tokenizer, 0, None, autocast=contextlib.nullcontext)["masked"]

    plain = val_loss()
    for n in range(3):
        save(root / f"img_{n}-masklabel.png", np.full((64, 64), 255, np.uint8))
    assert val_loss() == plain
    for n in range(3):
        save(root / f"img_{n}-masklabel.png", left_half_white((64, 64)))
    assert val_loss(1.0) == plain and val_loss() != plain
