"""Tests for data/: bucket tables, scanning and captions, batch plans, image decoding, the loader.

Everything runs on real files written with PIL into tmp_path and a real (tiny, in-memory) CLIP
tokenizer; nothing of ours is mocked.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import string
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from data import (Caption, DataError, EpochBatches, ImageRecord, RatedDataset, SampleOptions, Tag,
                  assign_buckets, build_epoch_batches, buckets_for, epoch_plan_summary, is_undersized,
                  make_epoch_loader, nearest_bucket, scan, write_schedule)
from data.buckets import BUCKET_TABLES
from data.captions import assemble_caption
from data.images import crop_box, load_training_image, open_oriented_rgb
from data.loader import sample_rng

# REFERENCE §3.1: resolution -> number of buckets
REFERENCE_COUNTS = {256: 5, 320: 7, 384: 7, 448: 7, 512: 11, 576: 11, 640: 15, 704: 15, 768: 17,
                    832: 17, 896: 13, 960: 15, 1024: 15, 1088: 17, 1152: 17, 1280: 15, 1536: 17}

ORIENTATION = 0x0112


# ---------------------------------------------------------------- helpers

def save_image(path, size=(64, 48), color=(200, 30, 30), mode="RGB", **save_kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_kwargs)
    return path


def exif_with_orientation(value):
    exif = Image.Exif()
    exif[ORIENTATION] = value
    return exif


def write_png_rgb16(path, pixels):
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), pixels: uint16 array [H, W, 3]."""
    h, w, _ = pixels.shape

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def record(i, bucket, **kw):
    return ImageRecord(path=f"/data/img{i}.jpg", caption=Caption(f"img{i}"), width=bucket[0],
                       height=bucket[1], bucket=bucket, **kw)


@pytest.fixture(scope="module")
def tokenizer():
    # A real CLIP tokenizer with a character-level vocabulary: no download needed.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ",.!? '":
        for token in (c, c + "</w>"):
            vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


# ---------------------------------------------------------------- buckets

@pytest.mark.parametrize("resolution,count", sorted(REFERENCE_COUNTS.items()))
def test_bucket_tables_match_reference(resolution, count):
    table = buckets_for(resolution)
    assert len(table) == count
    assert table[0] == (resolution, resolution)
    assert len(set(table)) == len(table)


def test_bucket_tables_keep_compat_entries():
    assert set(BUCKET_TABLES) == set(REFERENCE_COUNTS)
    assert (1408, 1344) in buckets_for(1280) and (1152, 1408) not in buckets_for(1280)
    assert buckets_for(320)[-1] == (576, 640)
    assert buckets_for(768)[-2:] == [(1472, 320), (320, 1472)]


def test_derived_tables_scale_the_512_table():
    assert buckets_for(128) == [(128, 128), (160, 128), (128, 160), (160, 96), (96, 160),
                                (192, 96), (96, 192), (224, 64), (64, 224), (256, 64), (64, 256)]
    # at 64 px several entries round onto earlier ones; they are dropped, order kept
    assert buckets_for(64) == [(64, 64), (96, 64), (64, 96), (96, 32), (32, 96), (128, 32),
                               (32, 128)]
    with pytest.raises(ValueError, match="resolution 100"):
        buckets_for(100)


@pytest.mark.parametrize("size,expected", [
    ((1000, 1000), (512, 512)),
    ((1600, 900), (640, 384)),     # 1.78: 640x384 (1.67) beats 768x320 (2.4)
    ((900, 1600), (384, 640)),
    ((3000, 1000), (896, 256)),    # 3.0: 896x256 (3.5) beats 768x320 (2.4)
    ((100, 10000), (256, 1024)),
    ((1200, 1000), (576, 448)),
])
def test_nearest_bucket(size, expected):
    assert nearest_bucket(*size, buckets_for(512)) == expected


def test_nearest_bucket_ties_go_to_the_earlier_entry():
    # 3:2 is exactly 0.5 away from both 1:1 and 2:1
    assert nearest_bucket(300, 200, [(64, 64), (128, 64)]) == (64, 64)
    assert nearest_bucket(300, 200, [(128, 64), (64, 64)]) == (128, 64)


def test_undersized():
    assert is_undersized(ImageRecord("a", Caption("a"), 300, 300, bucket=(512, 512)))
    assert not is_undersized(ImageRecord("a", Caption("a"), 512, 300, bucket=(512, 512)))
    assert not is_undersized(ImageRecord("a", Caption("a"), 600, 600, bucket=(512, 512)))


# ---------------------------------------------------------------- scan and captions

def test_scan_finds_nested_images_and_reports_unreadable_ones(tmp_path):
    root = tmp_path / "root"
    save_image(root / "top.png")
    save_image(root / "a" / "b" / "deep.jpg")
    save_image(root / "a" / "UPPER.JPG")
    save_image(root / "a" / "bitmap.bmp")
    save_image(root / "a" / "web.webp")
    save_image(root / "a" / "jf.jfif", format="JPEG")
    save_image(root / ".hidden.jpg")
    save_image(root / ".cache" / "inside_dot_folder.jpg")
    save_image(root / "anim.gif")                      # not a training extension
    (root / "notes.md").write_text("not an image")
    (root / "zero.jpg").write_bytes(b"")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    (root / "text.png").write_text("this is not a png")

    result = scan(str(root))

    names = [r.path.split("/")[-1] for r in result.records]
    # depth-first: a folder's files (sorted) before its subfolders
    assert names == ["top.png", "UPPER.JPG", "bitmap.bmp", "jf.jfif", "web.webp", "deep.jpg"]
    assert all(r.path.startswith(str(root)) for r in result.records)
    assert sorted(p.split("/")[-1] for p, _ in result.problems) == [
        "corrupt.jpg", "text.png", "zero.jpg"]
    assert all(reason for _, reason in result.problems)
    assert all((r.width, r.height) == (64, 48) for r in result.records)


def test_empty_scan_is_a_data_error_naming_the_folder(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    result = scan(str(tmp_path))
    assert result.records == [] and len(result.problems) == 1
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        result.require_images()
    with pytest.raises(DataError, match="neither a folder nor a manifest"):
        scan(str(tmp_path / "missing"))


def test_caption_precedence(tmp_path):
    save_image(tmp_path / "only_txt.png")
    (tmp_path / "only_txt.txt").write_text("a dog,  running , grass\n")
    save_image(tmp_path / "both.png")
    (tmp_path / "both.txt").write_text("from txt, t1, shared")
    (tmp_path / "both.caption").write_text("from caption, c1, shared")
    save_image(tmp_path / "cat, sitting_02.png")
    save_image(tmp_path / "a.b.png")                   # base name keeps inner dots
    (tmp_path / "a.b.txt").write_text("dotted")
    save_image(tmp_path / "latin.png")
    (tmp_path / "latin.txt").write_bytes("café, crème".encode("latin-1"))
    save_image(tmp_path / "bom.png")
    (tmp_path / "bom.txt").write_bytes("\ufeffsmile, 😀".encode("utf-8"))
    save_image(tmp_path / "tagsonly_x.png")
    (tmp_path / "tagsonly_x.txt").write_text(", tag1")

    captions = {r.path.split("/")[-1]: str(r.caption) for r in scan(str(tmp_path)).records}

    assert captions["only_txt.png"] == "a dog, running, grass"
    # .caption is read after .txt: its main prompt wins; tags are the union, later source first
    assert captions["both.png"] == "from caption, c1, shared, t1"
    assert captions["cat, sitting_02.png"] == "cat, sitting"
    assert captions["a.b.png"] == "dotted"
    assert captions["latin.png"] == "café, crème"
    assert captions["bom.png"] == "smile, 😀"
    # no main prompt in the sidecar: the file name supplies it, the sidecar tags stay
    assert captions["tagsonly_x.png"] == "tagsonly, tag1"


@pytest.mark.parametrize("orientation,swapped", [(1, False), (3, False), (6, True), (8, True)])
def test_exif_orientation_sets_size_and_bucket(tmp_path, orientation, swapped):
    path = save_image(tmp_path / "photo.jpg", size=(200, 100),
                      exif=exif_with_orientation(orientation))
    [rec] = assign_buckets(scan(str(tmp_path)).records, 512)
    assert (rec.width, rec.height) == ((100, 200) if swapped else (200, 100))
    # |bw/bh - w/h| is not symmetric in w and h: 2:1 picks 5:3 but 1:2 picks 5:12 (as EveryDream2)
    assert rec.bucket == ((320, 768) if swapped else (640, 384))
    tensor = load_training_image(str(path), rec.bucket, random.Random(0))
    assert tensor.shape == (3, rec.bucket[1], rec.bucket[0])


def test_exif_rotation_turns_the_pixels(tmp_path):
    # stored pixels: left half red, right half blue; orientation 6 = display rotated 90° clockwise,
    # so the red half ends up on top
    img = Image.new("RGB", (200, 100), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 100, 100))
    img.save(tmp_path / "rot.png", exif=exif_with_orientation(6))
    [rec] = assign_buckets(scan(str(tmp_path)).records, 128)
    assert (rec.width, rec.height) == (100, 200)
    t = load_training_image(rec.path, rec.bucket, random.Random(0), jitter=False)
    h = t.shape[1]
    assert t[0, : h // 4].mean() > 0.9 and t[2, : h // 4].mean() < -0.9       # top red
    assert t[2, -h // 4:].mean() > 0.9 and t[0, -h // 4:].mean() < -0.9       # bottom blue


# ---------------------------------------------------------------- image modes and cropping

def test_unusual_modes_load_as_rgb(tmp_path):
    size = (96, 64)
    grey16 = np.full((64, 96), 65535, np.uint16)
    grey16[:, :48] = 32896                    # mid grey in 16 bits
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    rgb16 = np.zeros((64, 96, 3), np.uint16)
    rgb16[..., 1] = 65535
    write_png_rgb16(tmp_path / "rgb16.png", rgb16)
    save_image(tmp_path / "cmyk.jpg", size, (0, 255, 255, 0), mode="CMYK", quality=95)
    pal = Image.new("P", size, 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 48, 64))
    pal.save(tmp_path / "palette.png", transparency=0)      # index 0 (black) is transparent
    la = Image.new("LA", size, (0, 0))
    la.paste((0, 255), (0, 0, 48, 64))
    la.save(tmp_path / "la.png")

    bucket = (96, 64)
    load = {name: load_training_image(str(tmp_path / name), bucket, random.Random(1), jitter=False)
            for name in ("grey16.png", "rgb16.png", "cmyk.jpg", "palette.png", "la.png")}
    for name, t in load.items():
        assert t.shape == (3, 64, 96) and t.dtype == torch.float32, name
        assert t.min() >= -1 and t.max() <= 1, name

    g = load["grey16.png"]
    assert g[:, :, 60:].min() == 1.0                            # 65535 -> white, not clipped
    assert abs(g[:, :, :40].mean().item()) < 0.01               # 32896 -> 128 -> ~0
    assert torch.allclose(load["rgb16.png"].mean(dim=(1, 2)), torch.tensor([-1.0, 1.0, -1.0]))
    cmyk = load["cmyk.jpg"].mean(dim=(1, 2))
    assert cmyk[0] > 0.9 and cmyk[1] < -0.9 and cmyk[2] < -0.9  # C=0,M=Y=255 -> red
    p = load["palette.png"]
    assert p[1, :, :40].min() == 1.0 and p[0, :, :40].max() == -1.0   # opaque green
    assert p[:, :, 60:].min() == 1.0                                  # transparent -> white
    la_t = load["la.png"]
    assert la_t[:, :, :40].max() == -1.0 and la_t[:, :, 60:].min() == 1.0


def test_crop_box_keeps_bucket_aspect_and_jitter_bounds():
    rng = random.Random(3)
    for _ in range(200):
        w, h = rng.randint(50, 3000), rng.randint(50, 3000)
        bucket = nearest_bucket(w, h, buckets_for(512))
        left, top, right, bottom = crop_box((w, h), bucket, rng)
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        assert (right - left) / (bottom - top) == pytest.approx(bucket[0] / bucket[1], rel=1e-9)
        oversize = min(w / bucket[0], h / bucket[1]) - 1
        max_trim = int(min(0.02, oversize) * min(w, h)) if oversize > 0 else 0
        # the short side of the crop loses at most 2 x the per-edge jitter
        if (right - left) / w > (bottom - top) / h:
            assert w - (right - left) <= 2 * max_trim + 1e-6
        else:
            assert h - (bottom - top) <= 2 * max_trim + 1e-6
    # not larger than the bucket: no jitter, just the aspect crop (here none)
    assert crop_box((500, 500), (512, 512), random.Random(0)) == (0, 0, 500, 500)


def test_small_images_are_upscaled_and_big_jpegs_downscaled(tmp_path):
    save_image(tmp_path / "tiny.png", size=(20, 30))
    t = load_training_image(str(tmp_path / "tiny.png"), (128, 160), random.Random(0))
    assert t.shape == (3, 160, 128)
    # a big rotated JPEG (decoded at reduced DCT scale): stored 2400x1200 with the left half red,
    # displayed 1200x2400 with red on top
    big = Image.new("RGB", (2400, 1200), (0, 0, 255))
    big.paste((255, 0, 0), (0, 0, 1200, 1200))
    big.save(tmp_path / "big.jpg", exif=exif_with_orientation(6), quality=95)
    [rec] = [r for r in assign_buckets(scan(str(tmp_path)).records, 128) if "big" in r.path]
    assert rec.bucket == (96, 192)
    # decoded at 1/4 scale: still at least twice the bucket on both sides
    assert open_oriented_rgb(rec.path, min_size=(192, 384)).size == (300, 600)
    t = load_training_image(rec.path, rec.bucket, random.Random(0))
    assert t.shape == (3, 192, 96)
    assert t[0, :80].mean() > 0.95 and t[2, :80].mean() < -0.95
    assert t[2, -80:].mean() > 0.95 and t[0, -80:].mean() < -0.95


def test_truncated_image_is_a_data_error_naming_it(tmp_path):
    path = save_image(tmp_path / "cut.png", size=(300, 300), color=(1, 2, 3))
    noisy = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    [rec] = scan(str(tmp_path)).records      # the header is fine, so the scan keeps it
    with pytest.raises(DataError, match="cut.png"):
        load_training_image(rec.path, (128, 128), random.Random(0))


# ---------------------------------------------------------------- batch plans

BUCKETS = [(512, 512), (640, 384), (384, 640)]


def plan_records():
    # 7 + 4 + 1 images over three buckets
    return ([record(i, BUCKETS[0]) for i in range(7)]
            + [record(i, BUCKETS[1]) for i in range(7, 11)]
            + [record(11, BUCKETS[2])])


def test_batches_never_mix_buckets_and_pad_runts():
    records = plan_records()
    plan = build_epoch_batches(records, batch_size=3, seed=555, epoch=0)
    assert len(plan) == 3 + 2 + 1
    assert all(len(b.indices) == 3 for b in plan)
    for b in plan:
        assert {records[i].bucket for i in b.indices} == {b.bucket}
    runts = [b for b in plan if b.runt_size]
    assert sorted((b.bucket, b.runt_size) for b in runts) == sorted(
        [(BUCKETS[0], 1), (BUCKETS[1], 1), (BUCKETS[2], 1)])
    for b in runts:      # padding repeats the runt's own items
        assert set(b.indices) == set(b.indices[:b.runt_size])
    seen = [i for b in plan for i in (b.indices[:b.runt_size] if b.runt_size else b.indices)]
    assert sorted(seen) == list(range(len(records)))   # every image exactly once, none dropped


def test_runt_size_counts_leftover_items():
    records = [record(i, BUCKETS[0]) for i in range(11)]
    plan = build_epoch_batches(records, batch_size=4, seed=1, epoch=0)
    assert sorted(b.runt_size for b in plan) == [0, 0, 3]
    [runt] = [b for b in plan if b.runt_size]
    assert len(set(runt.indices[:3])) == 3 and runt.indices[3] in runt.indices[:3]


def test_plan_is_deterministic_per_seed_and_epoch():
    records = [record(i, BUCKETS[i % 3]) for i in range(60)]
    a = build_epoch_batches(records, 4, seed=7, epoch=2)
    assert a == build_epoch_batches(records, 4, seed=7, epoch=2)
    assert a != build_epoch_batches(records, 4, seed=7, epoch=3)
    assert a != build_epoch_batches(records, 4, seed=8, epoch=2)


def test_plan_summary():
    records = plan_records()
    plan = build_epoch_batches(records, batch_size=3, seed=0, epoch=0)
    s = epoch_plan_summary(plan, batch_size=3)
    assert (s.images, s.steps, s.padded) == (12, 6, 6)
    assert dict(s.buckets) == {("default_batch", BUCKETS[0]): 7,
                               ("default_batch", BUCKETS[1]): 4,
                               ("default_batch", BUCKETS[2]): 1}
    # only the 1-image bucket gets more than half again its size in padding
    assert len(s.warnings) == 1 and "384x640" in s.warnings[0] and "3:5" in s.warnings[0]
    assert s.lines()[0].startswith("12 images, 6 steps per epoch")


SCHEDULE_LINE = re.compile(r"step:(\d{5}), wh:\[(\d+), (\d+)\], r:(\d+), path:(/.+), "
                           r"batch_id:(.+), flip:([01]), caption:(.*)")


def test_write_schedule(tmp_path):
    records = plan_records()
    plan = build_epoch_batches(records, batch_size=3, seed=0, epoch=0)
    out = tmp_path / "ep0_batch_schedule.txt"
    write_schedule(str(out), EpochBatches(plan, records, None, SampleOptions(), seed=0, epoch=0))
    lines = out.read_text().splitlines()
    assert len(lines) == 18
    for n, line in enumerate(lines):
        m = SCHEDULE_LINE.fullmatch(line)
        assert m, line
        step = int(m[1])
        assert step == n // 3
        assert (int(m[2]), int(m[3])) == plan[step].bucket
        assert int(m[4]) == plan[step].runt_size
        assert m[5] == records[plan[step].indices[n % 3]].path
        assert (m[6], m[7]) == ("default_batch", "0")
        assert m[8] == str(records[plan[step].indices[n % 3]].caption)


# ---------------------------------------------------------------- loader

@pytest.fixture
def small_dataset(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [(128, 128), (130, 120), (200, 100), (100, 200), (90, 180), (256, 256), (300, 150)]
    for n, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"img{n}.png")
        (tmp_path / f"img{n}.txt").write_text(f"photo {n}, tag")
    return assign_buckets(scan(str(tmp_path)).records, 128)


def collect(loader):
    return [batch for batch in loader]


def test_loader_yields_bucket_shaped_batches(small_dataset, tokenizer):
    records = small_dataset
    plan = build_epoch_batches(records, batch_size=2, seed=5, epoch=0)
    batches = collect(make_epoch_loader(plan, records, tokenizer, cond_dropout=0.0, seed=5,
                                        epoch=0, num_workers=0, pin_memory=False))
    assert len(batches) == len(plan)
    for planned, batch in zip(plan, batches):
        w, h = planned.bucket
        assert batch["pixel_values"].shape == (2, 3, h, w)
        assert batch["pixel_values"].dtype == torch.float32
        assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
        assert batch["input_ids"].shape == (2, 77) and batch["input_ids"].dtype == torch.long
        assert batch["captions"] == [str(records[i].caption) for i in planned.indices]
        assert batch["runt_size"] == planned.runt_size
        assert batch["loss_scale"].tolist() == [1.0, 1.0]
    assert all(c.startswith("photo ") for b in batches for c in b["captions"])


def test_cond_dropout(small_dataset, tokenizer):
    records = small_dataset
    plan = build_epoch_batches(records, batch_size=1, seed=5, epoch=0)

    def captions(p, recs=records):
        loader = make_epoch_loader(plan, recs, tokenizer, p, seed=5, epoch=0, num_workers=0,
                                   pin_memory=False)
        return [c for b in loader for c in b["captions"]]

    assert captions(1.0) == [" "] * len(records)
    assert " " not in captions(0.0)
    # a per-image value overrides the global one
    keep_first = [dataclasses.replace(r, cond_dropout=0.0 if i == 0 else None)
                  for i, r in enumerate(records)]
    out = captions(1.0, keep_first)
    first_step = next(s for s, b in enumerate(plan) if b.indices[0] == 0)
    assert out[first_step] == str(records[0].caption)
    assert out.count(" ") == len(records) - 1
    # dropped captions tokenize to start + end/padding only
    dropped = make_epoch_loader(plan, records, tokenizer, 1.0, 5, 0, 0, False)
    ids = next(iter(dropped))["input_ids"][0]
    assert ids[0] == tokenizer.bos_token_id and (ids[1:] == tokenizer.eos_token_id).all()


def test_loader_is_reproducible_and_independent_of_workers(small_dataset, tokenizer):
    records = small_dataset
    plan = build_epoch_batches(records, batch_size=2, seed=9, epoch=1)
    args = dict(tokenizer=tokenizer, cond_dropout=0.5, seed=9, epoch=1, pin_memory=False)
    single = collect(make_epoch_loader(plan, records, num_workers=0, **args))
    torch_state = torch.get_rng_state()
    multi = collect(make_epoch_loader(plan, records, num_workers=2, **args))
    assert torch.equal(torch_state, torch.get_rng_state())   # global RNG untouched
    for a, b in zip(single, multi, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert a["captions"] == b["captions"]
    other_epoch = collect(make_epoch_loader(plan, records, num_workers=0,
                                            **{**args, "epoch": 2}))
    assert any(not torch.equal(a["pixel_values"], b["pixel_values"])
               for a, b in zip(single, other_epoch))


# ---------------------------------------------------------------- multiply, rated_dataset, batch_id, grad_accum

def real_indices(plan):
    return [i for b in plan for i in (b.indices[:b.runt_size] if b.runt_size else b.indices)]


def test_multiply_repeats_whole_part_and_draws_the_fraction_each_epoch():
    records = [record(0, BUCKETS[0], multiply=3.0), record(1, BUCKETS[0], multiply=1.5),
               record(2, BUCKETS[0], multiply=0.5), record(3, BUCKETS[0])]
    extras = Counter()
    for epoch in range(200):
        counts = Counter(real_indices(build_epoch_batches(records, 2, seed=3, epoch=epoch)))
        assert sum(counts.values()) == 6                      # floor(3 + 1.5 + 0.5 + 1)
        assert counts[0] == 3 and counts[3] == 1
        assert counts[1] + counts[2] == 2 and counts[1] >= 1
        extras[2 if counts[2] else 1] += 1
    assert extras[1] > 40 and extras[2] > 40                  # the fraction really is drawn, per epoch
    thirds = [record(i, BUCKETS[0], multiply=1 / 3) for i in range(3)]
    assert len(real_indices(build_epoch_batches(thirds, 1, seed=0, epoch=0))) == 1


def test_rated_dataset_keeps_a_shrinking_rating_weighted_subset():
    rated = RatedDataset(max_epochs=10, target_dropout_percent=50)
    assert [rated.fraction(e) for e in (0, 1, 2, 9)] == [1.0, 1.0, 0.95, 0.6]
    records = [record(i, BUCKETS[0], rating=10.0 if i < 10 else 1.0, multiply=2.0) for i in range(20)]
    assert len(real_indices(build_epoch_batches(records, 2, 0, epoch=1, rated=rated))) == 40  # full, multiplied
    high = 0
    for seed in range(50):
        picked = real_indices(build_epoch_batches(records, 2, seed, epoch=9, rated=rated))
        assert len(picked) == len(set(picked)) == 12          # ceil(20 x 0.6), multiply ignored
        high += sum(i < 10 for i in picked)
    assert high / (50 * 12) > 0.75                            # rating 10 beats rating 1


def test_batch_ids_never_mix_and_their_surplus_trains_in_default_batches():
    records = ([record(i, BUCKETS[0], batch_id="horses") for i in range(5)]
               + [record(i, BUCKETS[0]) for i in range(5, 8)]
               + [record(i, BUCKETS[1], batch_id="cats") for i in range(8, 12)])
    for epoch in range(5):
        plan = build_epoch_batches(records, batch_size=2, seed=1, epoch=epoch)
        assert len(plan) == 6 and not any(b.runt_size for b in plan)
        demoted = 0
        for b in plan:
            own = {records[i].batch_id for i in b.indices}
            if b.batch_id == "default_batch":
                demoted += sum(records[i].batch_id == "horses" for i in b.indices)
            else:
                assert own == {b.batch_id}
        assert demoted == 1                                   # 5 horses = 2 batches + 1 surplus
    summary = epoch_plan_summary(plan, 2, records)
    assert summary.demoted == [("horses", BUCKETS[0], 1, 5)]
    assert any("batch_id 'horses' has 5 samples in bucket 512x512" in line and "1 of them train in "
               "default_batch" in line for line in summary.lines())


def test_grad_accum_packs_a_batch_id_into_the_same_updates():
    records = ([record(i, BUCKETS[0], batch_id="x") for i in range(4)]
               + [record(i, BUCKETS[1], batch_id="y") for i in range(4, 6)]
               + [record(i, BUCKETS[2]) for i in range(6, 11)])
    for epoch in range(10):
        plan = build_epoch_batches(records, batch_size=1, seed=2, epoch=epoch, grad_accum=3)
        assert len(plan) == 11
        windows = [{b.batch_id for b in plan[i:i + 3]} for i in range(0, 11, 3)]
        # x's 4 chunks: one whole update plus one slot; y's 2 chunks share one update
        assert windows.count({"x"}) == 1 and sum("y" in w for w in windows) == 1
        assert sum("x" in w for w in windows) == 2
        assert windows[-1] == {"default_batch"}               # the incomplete update comes last
    assert build_epoch_batches(records, 1, 2, 0, grad_accum=3) != build_epoch_batches(records, 1, 2, 1, grad_accum=3)


# ---------------------------------------------------------------- flips, tag shuffling, schedule, broken files

def loader_batches(records, plan, tokenizer, **kw):
    args = dict(cond_dropout=0.0, seed=5, epoch=0, num_workers=0)
    return collect(make_epoch_loader(plan, records, tokenizer, **{**args, **kw}))


def test_flip_mirrors_after_crop_and_per_image_values_win(small_dataset, tokenizer):
    records = small_dataset
    plan = build_epoch_batches(records, batch_size=1, seed=5, epoch=0)
    plain = loader_batches(records, plan, tokenizer)
    flipped = loader_batches(records, plan, tokenizer, flip_p=1.0)
    for a, b in zip(plain, flipped, strict=True):
        assert torch.equal(b["pixel_values"], torch.flip(a["pixel_values"], dims=[-1]))
        assert not torch.equal(a["pixel_values"], b["pixel_values"])   # random pixels are not symmetric
    never = [dataclasses.replace(r, flip_p=0.0) for r in records]
    for a, b in zip(plain, loader_batches(never, plan, tokenizer, flip_p=1.0), strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_shuffle_tags_keeps_main_prompt_and_first_tags_in_place():
    caption = Caption("main", tuple(Tag(f"t{i}") for i in range(6)))
    orders = set()
    for seed in range(30):
        text = assemble_caption(caption, True, 2, 2048, random.Random(seed))
        parts = text.split(", ")
        assert parts[:3] == ["main", "t0", "t1"] and sorted(parts[3:]) == ["t2", "t3", "t4", "t5"]
        orders.add(text)
    assert len(orders) > 5
    assert assemble_caption(caption, False, 0, 2048, None) == "main, t0, t1, t2, t3, t4, t5"


def test_weighted_tags_are_drawn_by_weight_within_the_length_budget():
    caption = Caption("m", (Tag("heavy", 8.0), Tag("light", 1.0), Tag("mid", 3.0), Tag("other", 1.0)))
    firsts = Counter()
    for seed in range(400):
        tags = assemble_caption(caption, True, 2, 8, random.Random(seed)).split(", ")[1:]
        # budget 8 - len("m") = 7: a tag is added while the tag text is shorter; the last may overshoot
        assert len(", ".join(tags[:-1])) < 7 and len(set(tags)) == len(tags)
        firsts[tags[0]] += 1
    assert firsts["heavy"] > firsts["mid"] > firsts["light"]
    assert firsts["heavy"] / 400 == pytest.approx(8 / 13, abs=0.08)


def test_schedule_shows_what_each_step_trains(small_dataset, tokenizer, tmp_path):
    records = [dataclasses.replace(r, caption=Caption(f"photo {n}", tuple(Tag(f"t{k}") for k in range(4))))
               for n, r in enumerate(small_dataset)]
    plan = build_epoch_batches(records, batch_size=2, seed=5, epoch=1)
    kw = dict(cond_dropout=0.3, seed=5, epoch=1, flip_p=0.5, shuffle_tags=True, keep_tags=1)
    loader = make_epoch_loader(plan, records, tokenizer, **kw)
    write_schedule(tmp_path / "s.txt", loader.dataset)
    lines = [SCHEDULE_LINE.fullmatch(line) for line in (tmp_path / "s.txt").read_text().splitlines()]
    trained = [(c, batch["pixel_values"][slot]) for batch in loader for slot, c in enumerate(batch["captions"])]
    assert len(lines) == len(trained) == 2 * len(plan)
    flips = {m[7] for m in lines}
    assert flips == {"0", "1"} and {m[8] for m in lines} >= {" "}    # flips and dropouts both happen
    for n, (m, (caption, pixels)) in enumerate(zip(lines, trained)):
        assert m[8] == caption
        step, slot = divmod(n, 2)
        record_ = records[plan[step].indices[slot]]
        unflipped = load_training_image(record_.path, plan[step].bucket, sample_rng(5, 1, step, slot, "crop"))
        assert torch.equal(pixels, torch.flip(unflipped, [-1]) if m[7] == "1" else unflipped)


def test_undecodable_image_is_replaced_and_reported_once(tmp_path, tokenizer, caplog):
    rng = np.random.default_rng(0)
    for n in range(3):
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(tmp_path / f"ok{n}.png")
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:3000])  # header intact
    result = scan(str(tmp_path))
    records = assign_buckets(result.records, 128)
    assert len(records) == 4 and not result.problems
    cut = next(i for i, r in enumerate(records) if r.path.endswith("cut.png"))
    caplog.set_level(logging.WARNING)
    for epoch, batch_size in ((0, 2), (1, 2), (2, 1)):
        plan = build_epoch_batches(records, batch_size, seed=1, epoch=epoch)
        loader = make_epoch_loader(plan, records, tokenizer, 0.0, seed=1, epoch=epoch, skipped=result.skipped)
        batches = collect(loader)
        assert len(batches) == len(plan) and all(b["pixel_values"].shape[0] == batch_size for b in batches)
        for planned, batch in zip(plan, batches):
            if cut in planned.indices:      # its slot holds a duplicate of an image that decoded
                slot = planned.indices.index(cut)
                others = load_all(records, cut, planned.bucket)
                assert any(torch.equal(batch["pixel_values"][slot], t) for t in others)
    assert [p for p, _ in result.problems] == [records[cut].path]
    assert [r.message for r in caplog.records].count(
        f"skipped {records[cut].path}: {result.problems[0][1]}; its batches use a duplicate of another image "
        f"instead") == 1


def load_all(records, excluded, bucket):
    """Every other image of the bucket, as the loader decodes it (128x128 into a 128x128 bucket: no crop)."""
    return [load_training_image(r.path, bucket, random.Random(0), jitter=False)
            for i, r in enumerate(records) if i != excluded and r.bucket == bucket]
