"""Validation (REFERENCE §4): the JSON, the split, the schedule, and passes on the tiny model logged to TensorBoard."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

import data
from tests.conftest import DEMO_DATA, REPO, TINY_MODEL, write_json
from utils.options.config import ConfigError
from utils.objective.step import StepSettings
from utils.watch.validation import KEYS, ValidationConfig, Validator, load_validation_config, split_records

RESOLUTION = 128  # the demo images and the tiny model's training size


@pytest.fixture(scope="module")
def demo_records():
    return data.assign_buckets(data.scan(str(DEMO_DATA)).records, RESOLUTION)


def copy_images(names: list[str], folder: Path) -> Path:
    """Demo images (with their captions) copied into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        for suffix in (".png", ".txt"):
            shutil.copy(DEMO_DATA / f"{name}{suffix}", folder / f"{name}{suffix}")
    return folder


def load(tmp_path, settings: dict) -> ValidationConfig:
    return load_validation_config(write_json(tmp_path / "validation.json", settings))


def training(**changes) -> StepSettings:
    """Training step settings with every loss-shaping option on: validation must ignore those."""
    return dataclasses.replace(StepSettings(
        loss_type="mse_huber", zero_frequency_noise_ratio=0.1, timestep_start=0, timestep_end=1000, batch_size=4,
        pyramid_noise_discount=None, embedding_perturbation=0.5, min_snr_gamma=5.0, clip_skip=0), **changes)


# ---------------------------------------------------------------- the JSON

def test_shipped_example_has_every_key_documented_and_loads_as_the_defaults():
    path = REPO / "cfgs" / "validation.json"
    raw = json.loads(path.read_text())
    assert set(KEYS) <= set(raw) and set(KEYS) <= set(raw["documentation"])
    assert load_validation_config(path) == ValidationConfig(path=str(path))


def test_missing_keys_and_nulls_take_the_defaults(tmp_path):
    cfg = load(tmp_path, {"seed": None, "batch_size": None, "every_n_epochs": 0.5})
    assert (cfg.seed, cfg.batch_size, cfg.every_n_epochs, cfg.validate_training, cfg.val_split_mode,
            cfg.auto_split_proportion) == (555, None, 0.5, True, "automatic", 0.15)


@pytest.mark.parametrize("settings, key, fix", [
    ({"auto_split_proprtion": 0.2}, "auto_split_proprtion", "Did you mean 'auto_split_proportion'"),
    ({"zzz": 1}, "zzz", "Valid keys: validate_training"),
    ({"val_split_mode": "auto"}, "val_split_mode", "choose one of: automatic, manual, none"),
    ({"auto_split_proportion": 0}, "auto_split_proportion", "above 0 and below 1"),
    ({"stabilize_split_proportion": 1.5}, "stabilize_split_proportion", "above 0 and below 1"),
    ({"auto_split_proportion": "0.2"}, "auto_split_proportion", "must be a number"),
    ({"every_n_epochs": 0}, "every_n_epochs", "0.5 = twice per epoch"),
    ({"seed": -1}, "seed", "fixed seed"),
    ({"seed": 1.5}, "seed", "whole number"),
    ({"batch_size": 0}, "batch_size", "at least 1"),
    ({"validate_training": "yes"}, "validate_training", "true or false"),
    ({"use_relative_loss": 1}, "use_relative_loss", "true or false"),
    ({"val_split_mode": "manual"}, "val_split_mode", "Set manual_data_root"),
    ({"val_split_mode": "manual", "manual_data_root": "no/such/folder"}, "manual_data_root",
     "neither a folder nor a manifest .json"),
    ({"val_split_mode": "manual", "manual_data_root": str(DEMO_DATA / "red_circle_00.txt")}, "manual_data_root",
     "neither a folder nor a manifest .json"),
    ({"manual_data_root": 3}, "manual_data_root", "folder or manifest .json path"),
    ({"extra_manual_datasets": ["val2"]}, "extra_manual_datasets", "object of name to folder"),
    ({"extra_manual_datasets": {"val": str(DEMO_DATA)}}, "extra_manual_datasets", "reserved"),
    ({"extra_manual_datasets": {"x": "no/such/folder"}}, "extra_manual_datasets.x", "neither a folder nor"),
    ({"val_data_root": "a", "manual_data_root": "b"}, "val_data_root", "Keep only 'manual_data_root'"),
])
def test_bad_settings_name_the_file_the_key_and_the_fix(tmp_path, settings, key, fix):
    with pytest.raises(ConfigError) as error:
        load(tmp_path, settings)
    message = str(error.value)
    assert str(tmp_path / "validation.json") in message and key in message and fix in message, message


@pytest.mark.parametrize("text, fix", [
    (None, "not found"),
    ('{"seed": 1,}', "not valid JSON (line 1"),
    ("[1, 2]", "expected a JSON object"),
])
def test_unreadable_files_are_config_errors(tmp_path, text, fix):
    path = tmp_path / "validation.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_validation_config(path)
    assert str(path) in str(error.value) and fix in str(error.value)


def test_old_names_work_with_a_warning_and_documentation_is_ignored(tmp_path, caplog):
    folder = copy_images(["red_circle_00"], tmp_path / "val")
    cfg = load(tmp_path, {"documentation": {"anything": 1}, "val_split_mode": "manual",
                          "val_data_root": str(folder), "val_split_proportion": 0.3})
    assert cfg.manual_data_root == str(folder) and cfg.auto_split_proportion == 0.3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'val_data_root' is the old name of 'manual_data_root'" in w for w in warnings)
    assert any("'val_split_proportion' is the old name of 'auto_split_proportion'" in w for w in warnings)


def test_quoted_booleans_are_taken_at_their_word_with_a_warning(tmp_path, caplog):
    cfg = load(tmp_path, {"validate_training": "false", "stabilize_training_loss": "TRUE"})
    assert cfg.validate_training is False and cfg.stabilize_training_loss is True
    assert sum("without quotes" in r.getMessage() for r in caplog.records) == 2


def test_an_unused_manual_folder_is_only_a_warning(tmp_path, caplog):
    cfg = load(tmp_path, {"manual_data_root": "no/such/folder"})  # automatic mode does not read it
    assert cfg.has_val_set() and "manual_data_root is ignored" in caplog.text


# ---------------------------------------------------------------- the split

def paths(records) -> list[str]:
    return [r.path for r in records]


def test_automatic_split_is_seeded_held_out_and_independent_of_scan_order(tmp_path, demo_records):
    cfg = load(tmp_path, {"seed": 7})
    python_state = random.getstate()
    train, sets = split_records(demo_records, cfg, RESOLUTION)
    assert random.getstate() == python_state  # the split draws from its own RNG
    assert list(sets) == ["val"] and len(sets["val"]) == math.ceil(0.15 * len(demo_records))
    assert not set(paths(sets["val"])) & set(paths(train))
    assert sorted(paths(sets["val"]) + paths(train)) == sorted(paths(demo_records))
    assert paths(train) == [p for p in paths(demo_records) if p not in paths(sets["val"])]  # order kept

    again_train, again = split_records(list(reversed(demo_records)), cfg, RESOLUTION)
    assert paths(again["val"]) == paths(sets["val"]) and set(paths(again_train)) == set(paths(train))
    _, other = split_records(demo_records, load(tmp_path, {"seed": 8}), RESOLUTION)
    assert set(paths(other["val"])) != set(paths(sets["val"]))


def test_tiny_proportions_still_hold_out_one_image_but_never_all(tmp_path, demo_records):
    _, sets = split_records(demo_records, load(tmp_path, {"auto_split_proportion": 0.001}), RESOLUTION)
    assert len(sets["val"]) == 1
    with pytest.raises(data.DataError, match="auto_split_proportion 0.99 of 1 training image"):
        split_records(demo_records[:1], load(tmp_path, {"auto_split_proportion": 0.99}), RESOLUTION)


def test_stabilize_subset_stays_in_training_and_held_out_items_are_plain(tmp_path, demo_records):
    # Training images with every per-image setting away from its default, as folder/yaml files will set them.
    special = [dataclasses.replace(r, multiply=3.0, flip_p=0.5, batch_id="faces", loss_scale=2.0, cond_dropout=0.3)
               for r in demo_records]
    cfg = load(tmp_path, {"stabilize_training_loss": True, "stabilize_split_proportion": 0.25})
    train, sets = split_records(special, cfg, RESOLUTION)
    assert list(sets) == ["val", "stabilize-train"]
    assert len(sets["stabilize-train"]) == math.ceil(0.25 * len(train))
    assert set(paths(sets["stabilize-train"])) <= set(paths(train))
    assert not set(paths(sets["stabilize-train"])) & set(paths(sets["val"]))
    assert all(r.multiply == 3.0 and r.loss_scale == 2.0 for r in train)  # training items are untouched
    by_path = {r.path: r for r in special}
    for item in sets["val"] + sets["stabilize-train"]:
        original = by_path[item.path]
        assert (item.multiply, item.flip_p, item.batch_id, item.loss_scale, item.cond_dropout) == \
            (1.0, 0.0, "default_batch", 1.0, None)
        assert (item.caption, item.bucket) == (original.caption, original.bucket)

    _, same = split_records(special, cfg, RESOLUTION)
    assert paths(same["stabilize-train"]) == paths(sets["stabilize-train"])


def test_manual_folder_and_extra_sets(tmp_path, demo_records, caplog):
    val = copy_images(["red_circle_00", "blue_square_00", "green_triangle_00"], tmp_path / "val")
    santa = copy_images(["yellow_cross_00", "yellow_cross_01"], tmp_path / "santa")
    cfg = load(tmp_path, {"val_split_mode": "manual", "manual_data_root": str(val),
                          "extra_manual_datasets": {"santa_suit": str(santa), "seen": str(DEMO_DATA)}})
    train, sets = split_records(demo_records, cfg, RESOLUTION)
    assert list(sets) == ["val", "santa_suit", "seen"]
    assert paths(train) == paths(demo_records)  # separate folders take nothing from training
    assert sorted(Path(p).name for p in paths(sets["val"])) == \
        ["blue_square_00.png", "green_triangle_00.png", "red_circle_00.png"]
    assert len(sets["santa_suit"]) == 2 and len(sets["seen"]) == len(demo_records)
    assert all(r.bucket == (128, 128) and r.caption.text() for r in sets["val"] + sets["santa_suit"])
    assert "40 image(s) of extra set 'seen' are also training images" in caplog.text


def test_manual_folder_inside_data_root_is_taken_out_of_training(tmp_path, caplog):
    root = copy_images(["red_circle_00", "red_circle_01", "blue_square_00"], tmp_path / "data")
    copy_images(["green_triangle_00", "green_triangle_01"], root / "val")
    records = data.assign_buckets(data.scan(str(root)).records, RESOLUTION)
    cfg = load(tmp_path, {"val_split_mode": "manual", "manual_data_root": str(root / "val")})
    train, sets = split_records(records, cfg, RESOLUTION)
    assert sorted(Path(p).name for p in paths(train)) == ["blue_square_00.png", "red_circle_00.png",
                                                          "red_circle_01.png"]
    assert len(sets["val"]) == 2 and "2 training image(s) are also in manual_data_root" in caplog.text


def test_manual_set_from_a_manifest_with_an_unreadable_image_reported(tmp_path, demo_records, caplog):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    manifest = write_json(tmp_path / "val.json", [
        {"image": str(DEMO_DATA / "red_circle_03.png"), "main_prompt": "a red circle", "flip_p": 1.0},
        {"image": str(tmp_path / "broken.png"), "main_prompt": "broken"}])
    cfg = load(tmp_path, {"val_split_mode": "manual", "manual_data_root": str(manifest)})
    _, sets = split_records(demo_records, cfg, RESOLUTION)
    (item,) = sets["val"]
    assert Path(item.path).name == "red_circle_03.png" and item.caption.text() == "a red circle"
    assert item.flip_p == 0.0  # validation images are never flipped, whatever their entry says
    assert "manual_data_root" in caplog.text and "broken.png" in caplog.text


def test_empty_manual_folder_is_a_data_error_naming_the_key(tmp_path, demo_records):
    (tmp_path / "empty").mkdir()
    cfg = load(tmp_path, {"extra_manual_datasets": {"night": str(tmp_path / "empty")}})
    with pytest.raises(data.DataError, match="extra_manual_datasets.night .* has no usable images"):
        split_records(demo_records, cfg, RESOLUTION)


def test_validate_training_false_leaves_only_the_explicit_sets(tmp_path, demo_records, caplog):
    santa = copy_images(["yellow_cross_00"], tmp_path / "santa")
    cfg = load(tmp_path, {"validate_training": False, "extra_manual_datasets": {"santa": str(santa)}})
    train, sets = split_records(demo_records, cfg, RESOLUTION)
    assert list(sets) == ["santa"] and len(train) == len(demo_records)
    assert "still evaluated: santa" in caplog.text
    cfg = load(tmp_path, {"validate_training": False})
    train, sets = split_records(demo_records, cfg, RESOLUTION)
    assert sets == {} and "no validation passes will run" in caplog.text
    assert not Validator(cfg, sets, training()).due(0, 4, 5)


# ---------------------------------------------------------------- the schedule

def passes(every_n_epochs, epochs: int, steps: int, demo_records, tmp_path) -> list[tuple[int, int]]:
    cfg = load(tmp_path, {"every_n_epochs": every_n_epochs})
    _, sets = split_records(demo_records, cfg, RESOLUTION)
    validator = Validator(cfg, sets, training())
    return [(e, s) for e in range(epochs) for s in range(steps) if validator.due(e, s, steps)]


def test_schedule_every_epoch_every_second_epoch_and_within_epochs(tmp_path, demo_records):
    assert passes(1, 3, 5, demo_records, tmp_path) == [(0, 4), (1, 4), (2, 4)]
    assert passes(2, 5, 5, demo_records, tmp_path) == [(1, 4), (3, 4)]
    # 0.5: two parts of ceil(10/2)=5 steps -> after steps 4 and 9; with 5 steps: after ceil(2.5)-1=2 and 4.
    assert passes(0.5, 2, 10, demo_records, tmp_path) == [(0, 4), (0, 9), (1, 4), (1, 9)]
    assert passes(0.5, 1, 5, demo_records, tmp_path) == [(0, 2), (0, 4)]
    assert passes(0.33, 1, 7, demo_records, tmp_path) == [(0, 2), (0, 4), (0, 6)]  # round(1/0.33) = 3 parts
    assert passes(0.01, 1, 3, demo_records, tmp_path) == [(0, 0), (0, 1), (0, 2)]  # at most one pass per step


# ---------------------------------------------------------------- passes on the tiny model

@pytest.fixture(scope="module")
def tiny():
    from utils.model import models

    model = models.load(TINY_MODEL)
    return model, model.noise_scheduler("ddpm")


@pytest.fixture
def writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(log_dir=str(tmp_path / "tb"))
    yield tb
    tb.close()


def run_pass(validator, tiny, writer, step=0):
    model, scheduler = tiny
    return validator.run(model.unet, model.text_encoder, model.vae, scheduler, model.tokenizer, step, writer,
                         autocast=contextlib.nullcontext)


def small_validator(tmp_path, demo_records, step_settings=None, **settings) -> Validator:
    """val = 3 demo images in a batch of 2 (one runt batch), plus whatever `settings` add."""
    cfg = load(tmp_path, {"auto_split_proportion": 3 / len(demo_records), "batch_size": 2, **settings})
    _, sets = split_records(demo_records, cfg, RESOLUTION)
    return Validator(cfg, sets, step_settings or training())


def test_passes_repeat_exactly_and_leave_training_randomness_and_modes_alone(tmp_path, demo_records, tiny, writer):
    model, _ = tiny
    settings = training()
    validator = small_validator(tmp_path, demo_records, settings, stabilize_training_loss=True,
                                stabilize_split_proportion=2 / len(demo_records))
    model.unet.train()
    model.text_encoder.eval()
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    first = run_pass(validator, tiny, writer)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert model.unet.training and not model.text_encoder.training
    assert all(p.grad is None for p in model.unet.parameters())

    torch.randn(100)  # training draws between passes must not change what validation draws
    settings.timestep_start = 900  # nor a live settings change: passes must stay comparable
    second = run_pass(validator, tiny, writer, step=10)
    assert set(first) == {"val", "stabilize-train"} and all(v > 0 for v in first.values())
    assert second == first  # bit-identical, not just close

    reseeded = small_validator(tmp_path, demo_records, seed=556)
    assert run_pass(reseeded, tiny, writer)["val"] != first["val"]


def test_the_loss_is_the_plain_mse_of_each_real_image(tmp_path, demo_records, tiny, writer):
    """Recomputed by hand for a set of 3 images in one batch of 4 (the 4th slot a padding duplicate): epsilon
    target; the training's timestep range, pyramid noise and clip_skip; no offset noise, embedding perturbation,
    Huber or min-SNR; captions never dropped; draws from a generator seeded with the config seed; the duplicate
    not counted."""
    from data.images import load_training_image
    from utils.objective.objectives import add_pyramid_noise
    from utils.objective.step import encode_text

    model, scheduler = tiny
    val = copy_images(["red_circle_00", "blue_square_00", "green_triangle_00"], tmp_path / "val")
    cfg = load(tmp_path, {"val_split_mode": "manual", "manual_data_root": str(val), "batch_size": 4, "seed": 3})
    _, sets = split_records(demo_records, cfg, RESOLUTION)
    validator = Validator(cfg, sets, training(batch_size=2, timestep_start=200, timestep_end=300,
                                              pyramid_noise_discount=0.3, clip_skip=2))
    (batch,) = validator.plans["val"]
    assert batch.runt_size == 3 and len(batch.indices) == 4

    records = sets["val"]
    pixels = torch.stack([load_training_image(records[i].path, batch.bucket, random.Random(0), False)
                          for i in batch.indices])
    ids = model.tokenizer([records[i].caption.text() for i in batch.indices], padding="max_length",
                          max_length=model.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.sample(generator) * model.vae.config.scaling_factor
        noise = add_pyramid_noise(torch.randn(latents.shape, generator=generator), 0.3, generator)
        t = torch.randint(200, 300, (4,), generator=generator)
        pred = model.unet(scheduler.add_noise(latents, noise, t), t, encode_text(model.text_encoder, ids, 2)).sample
    expected = ((pred - noise) ** 2).mean(dim=(1, 2, 3))[:3].mean().item()
    assert run_pass(validator, tiny, writer)["val"] == pytest.approx(expected, rel=1e-5)


def test_losses_are_written_to_tensorboard(tmp_path, demo_records, tiny, writer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    extra = copy_images(["yellow_cross_00", "yellow_cross_01"], tmp_path / "crosses")
    validator = small_validator(tmp_path, demo_records, use_relative_loss=True,
                                extra_manual_datasets={"crosses": str(extra)})
    returned = [run_pass(validator, tiny, writer, step) for step in (0, 5)]
    writer.close()

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    logged = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert set(logged) == {f"loss/{name}{suffix}" for name in ("val", "crosses", "_all_val_combined")
                           for suffix in ("", "_relative")}
    for name in ("val", "crosses"):
        assert logged[f"loss/{name}"] == [(0, pytest.approx(returned[0][name])),
                                          (5, pytest.approx(returned[1][name]))]
        assert logged[f"loss/{name}_relative"] == [(0, 1.0), (5, pytest.approx(1.0))]
    combined = (returned[0]["val"] + returned[0]["crosses"]) / 2
    assert logged["loss/_all_val_combined"][0] == (0, pytest.approx(combined))

    single = SummaryWriter(log_dir=str(tmp_path / "single"))
    run_pass(small_validator(tmp_path, demo_records), tiny, single)
    single.close()
    assert EventAccumulator(str(tmp_path / "single")).Reload().Tags()["scalars"] == ["loss/val"]  # nothing to combine


def test_a_rising_validation_loss_gets_the_overfitting_hint(tmp_path, tiny, writer, caplog):
    from PIL import Image

    model, _ = tiny
    # 12 passes over two sets: two demo images at 64 px (the smallest size the tiny model takes) keep it quick.
    for name in ("red_circle_00", "blue_square_00"):
        Image.open(DEMO_DATA / f"{name}.png").resize((64, 64)).save(tmp_path / f"{name}.png")
        shutil.copy(DEMO_DATA / f"{name}.txt", tmp_path / f"{name}.txt")
    records = data.assign_buckets(data.scan(str(tmp_path)).records, 64)
    cfg = load(tmp_path, {"auto_split_proportion": 0.5, "stabilize_training_loss": True,
                          "stabilize_split_proportion": 0.5})
    _, sets = split_records(records, cfg, 64)
    validator = Validator(cfg, sets, training(batch_size=1))
    bias = model.unet.conv_out.bias
    original = bias.detach().clone()
    # Shifting every prediction by c costs more the larger c is (checked below), so these offsets set the curve:
    # flat, then up and down so that the last five values rise overall (12th value: hint) though they fall
    # from the second of them on, then a fall (13th value: no hint).
    offsets = [0.0] * 7 + [1.0, 3.0, 2.0, 1.5, 1.2] + [0.0]
    hinted = []
    try:
        for step, offset in enumerate(offsets):
            with torch.no_grad():
                bias.copy_(original + offset)
            caplog.clear()
            run_pass(validator, tiny, writer, step)
            hinted.append([name for name in ("'val'", "'stabilize-train'") if f"Validation loss {name}" in
                           caplog.text])
    finally:
        with torch.no_grad():
            bias.copy_(original)
    by_offset = dict(zip(offsets, validator.history["val"]))
    assert [by_offset[c] for c in sorted(by_offset)] == sorted(by_offset.values())
    assert hinted == [[]] * 11 + [["'val'"], []]  # never before the 12th value, never for stabilize-train
