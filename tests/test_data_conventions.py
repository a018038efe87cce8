"""Dataset conventions (REFERENCE §2.1-§2.4, §2.8) and bad input, on real folders written to tmp_path.

Each test builds the files a user would, scans them with data.scan and checks the records, the skipped
files and the warnings the user is shown.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import struct
import zlib

import pytest
from PIL import Image

from data import Caption, DataError, Tag, scan
from data.images import MAX_IMAGE_PIXELS
from tests.test_data import save_image

# data/__init__ exports the function `scan`, which hides the module of the same name
scan_module = importlib.import_module("data.scan")


def by_name(result):
    return {os.path.basename(r.path): r for r in result.records}


def skipped(result):
    return {os.path.basename(path): reason for path, reason in result.problems}


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


FULL_YAML = """\
main_prompt: a photo of a cat
tags:
  - sitting
  - tag: window light
    weight: 2
rating: 3
max_caption_length: 40
multiply: 2.5
cond_dropout: 0.2
flip_p: 0.5
shuffle_tags: true
batch_id: cats
loss_scale: 0.8
"""


# ---------------------------------------------------------------- image sidecars

@pytest.mark.parametrize("ext", [".yaml", ".yml", ".json"])
def test_config_sidecar_sets_every_key(tmp_path, ext):
    import yaml

    save_image(tmp_path / "cat_01.jpg")
    content = yaml.safe_load(FULL_YAML)
    write(tmp_path / f"cat_01{ext}", json.dumps(content) if ext == ".json" else FULL_YAML)

    [rec] = scan(str(tmp_path)).records

    # tags: sorted by weight, highest first
    assert rec.caption == Caption("a photo of a cat", (Tag("window light", 2.0), Tag("sitting", 1.0)))
    assert (rec.rating, rec.max_caption_length, rec.multiply, rec.cond_dropout, rec.flip_p,
            rec.shuffle_tags, rec.batch_id, rec.loss_scale) == (3.0, 40, 2.5, 0.2, 0.5, True, "cats", 0.8)


def test_sidecars_merge_later_wins(tmp_path):
    save_image(tmp_path / "img.png")
    write(tmp_path / "img.txt", "from txt, t_txt, shared")
    write(tmp_path / "img.caption", "from caption, t_caption")
    write(tmp_path / "img.yml", "main_prompt: from yml\ntags: [t_yml, shared]\nmultiply: 2\nflip_p: 0.3\n")
    write(tmp_path / "img.yaml", "main_prompt: from yaml\ntags: [t_yaml]\nmultiply: 3\n")
    write(tmp_path / "img.json", '{"main_prompt": "from json", "tags": ["t_json"]}')

    [rec] = scan(str(tmp_path)).records

    # main prompt: the last sidecar read (.json); tags: the union, most specific source first
    assert str(rec.caption) == "from json, t_json, t_yaml, t_yml, shared, t_caption, t_txt"
    assert (rec.multiply, rec.flip_p) == (3.0, 0.3)


def test_caption_key_text_file_and_mapping(tmp_path):
    save_image(tmp_path / "text.png")
    write(tmp_path / "text.yaml", "main_prompt: ignored\ntags: [own]\ncaption: the caption, from caption\n")
    save_image(tmp_path / "file.png")
    write(tmp_path / "file.yaml", "caption: shared/caption.txt\nbatch_id: g\n")
    write(tmp_path / "shared" / "caption.txt", "from a shared file, st")
    save_image(tmp_path / "map.png")
    write(tmp_path / "map.yaml", "multiply: 2\ncaption:\n  main_prompt: from mapping\n  multiply: 3\n")
    # (compat) a .txt whose whole text names another caption file: that file is read instead
    save_image(tmp_path / "ref.png")
    write(tmp_path / "ref.txt", "shared/ref.yaml\n")
    write(tmp_path / "shared" / "ref.yaml", "main_prompt: referenced\nflip_p: 1\n")

    recs = by_name(scan(str(tmp_path)))

    assert str(recs["text.png"].caption) == "the caption, from caption, own"
    assert str(recs["file.png"].caption) == "from a shared file, st" and recs["file.png"].batch_id == "g"
    assert str(recs["map.png"].caption) == "from mapping" and recs["map.png"].multiply == 3.0
    assert str(recs["ref.png"].caption) == "referenced" and recs["ref.png"].flip_p == 1.0


def test_sidecar_extensions_match_in_any_case_and_captions_are_one_line(tmp_path):
    save_image(tmp_path / "Photo.JPG")
    write(tmp_path / "Photo.TXT", "a  photo\nof a dog,\n\tbrown ,\n")

    [rec] = scan(str(tmp_path)).records

    assert str(rec.caption) == "a photo of a dog, brown"


def test_main_prompt_list_uses_the_first_with_a_warning(tmp_path):
    save_image(tmp_path / "a.png")
    write(tmp_path / "a.yaml", "main_prompt: [first prompt, second prompt]\n")

    result = scan(str(tmp_path))

    assert result.records[0].caption.main_prompt == "first prompt"
    [line] = result.summary_lines()
    assert "a.yaml line 1" in line and "only the first, 'first prompt'" in line


def test_unknown_keys_are_ignored_with_a_hint(tmp_path):
    for i in range(3):
        save_image(tmp_path / f"img{i}.png")
        write(tmp_path / f"img{i}.yaml", "main_prompt: x\ncond_droput: 0.5\n")

    result = scan(str(tmp_path))

    assert all(r.cond_dropout is None for r in result.records)
    # one line for all three files, not three
    [line] = result.summary_lines()
    assert "unknown key 'cond_droput' ignored (did you mean 'cond_dropout'?): 3 files" in line


# ---------------------------------------------------------------- folder files

def test_folder_files_and_inheritance(tmp_path):
    root = tmp_path / "data"
    write(root / "global.yaml", "main_prompt: global prompt\ntags: [g1]\nflip_p: 0.1\n")
    write(root / "multiply.txt", "2\n")
    write(root / "batch_id.txt", "  root group \n")
    save_image(root / "a.jpg")
    sub = root / "sub"
    write(sub / "global.yml", "tags:\n  - tag: s1\n    weight: 2\ncond_dropout: 0.3\n")
    write(sub / "local.yaml", "tags: [l1]\nloss_scale: 0.5\nbatch_id: local group\nshuffle_tags: true\n")
    write(sub / "loss_scale.txt", "0.25")      # read after local.yaml: wins
    write(sub / "flip_p.txt", "1")
    save_image(sub / "b.jpg")
    write(sub / "b.txt", "b prompt, bt")
    save_image(sub / "deeper" / "c_01.jpg")
    write(root / "other" / "shuffle_tags.txt", "")
    save_image(root / "other" / "d.png")

    recs = by_name(scan(str(root)))

    a = recs["a.jpg"]
    assert str(a.caption) == "global prompt, g1"
    assert (a.multiply, a.batch_id, a.flip_p, a.loss_scale, a.shuffle_tags) == (2.0, "root group", 0.1, 1.0, False)
    b = recs["b.jpg"]
    # tags: image sidecar, then local, then globals nearest first; then by weight
    assert str(b.caption) == "b prompt, s1, bt, l1, g1"
    assert (b.multiply, b.batch_id, b.loss_scale, b.flip_p, b.cond_dropout, b.shuffle_tags) == \
        (1.0, "local group", 0.25, 1.0, 0.3, True)
    c = recs["c_01.jpg"]
    # neither folder files nor batch_id are inherited; both globals are
    assert str(c.caption) == "global prompt, s1, g1"
    assert (c.multiply, c.batch_id, c.loss_scale, c.flip_p, c.cond_dropout, c.shuffle_tags) == \
        (1.0, "default_batch", 1.0, 0.1, 0.3, False)
    assert recs["d.png"].shuffle_tags is True


def test_file_name_caption_only_when_no_main_prompt_anywhere(tmp_path):
    save_image(tmp_path / "cat, sitting_02.png")
    save_image(tmp_path / "tagsonly_x.png")
    write(tmp_path / "tagsonly_x.txt", ", tag1")
    save_image(tmp_path / "sub" / "dog_1.png")
    write(tmp_path / "sub" / "local.yaml", "main_prompt: from local\n")

    recs = by_name(scan(str(tmp_path)))

    assert str(recs["cat, sitting_02.png"].caption) == "cat, sitting"
    assert str(recs["tagsonly_x.png"].caption) == "tagsonly, tag1"
    assert str(recs["dog_1.png"].caption) == "from local"


# ---------------------------------------------------------------- broken caption and config files

@pytest.mark.parametrize("name,content,message", [
    ("img.yaml", "main_prompt: a cat\ntags: [unclosed\n", r"img\.yaml line 3: not valid YAML"),
    ("img.json", '{"main_prompt": "a cat",\n "tags": ["x",]}', r"img\.json line 2: not valid JSON"),
    ("img.yaml", "main_prompt: a cat\nmultiply: lots\n",
     r"img\.yaml line 2: key 'multiply' must be a number such as 2\.5, got text 'lots'"),
    ("img.yaml", "flip_p: 2\n", r"img\.yaml line 1: key 'flip_p' 2\.0 is a probability"),
    ("img.yaml", "tags:\n  - ok\n  - tag: bad\n    weight: -1\n",
     r"img\.yaml line 4: key 'tags' tag 'bad' has weight -1\.0"),
    ("img.yaml", "shuffle_tags: maybe\n", r"img\.yaml line 1: key 'shuffle_tags' must be true or false"),
    ("img.yaml", "- a list\n", r"img\.yaml line 1: expected a mapping of keys"),
    ("img.json", '{"multiply": -2}', r"img\.json line 1: key 'multiply' -2\.0 is negative"),
])
def test_broken_image_sidecar_skips_the_image_naming_file_and_line(tmp_path, name, content, message):
    save_image(tmp_path / "img.png")
    write(tmp_path / name, content)
    save_image(tmp_path / "fine.png")

    result = scan(str(tmp_path))

    assert [os.path.basename(r.path) for r in result.records] == ["fine.png"]
    [(path, reason)] = result.problems
    assert path == str(tmp_path / "img.png")
    assert re.search(message, reason), reason
    assert str(tmp_path / name) in reason


def test_unreadable_caption_file_skips_the_image(tmp_path):
    save_image(tmp_path / "img.png")
    (tmp_path / "img.txt").symlink_to(tmp_path / "nowhere.txt")   # listed, but cannot be opened

    result = scan(str(tmp_path))

    assert result.records == []
    [(path, reason)] = result.problems
    assert path.endswith("img.png") and "img.txt: cannot read" in reason


def test_broken_folder_files_are_ignored_and_listed(tmp_path):
    write(tmp_path / "local.yaml", "main_prompt: local\n  bad indent: [\n")
    write(tmp_path / "multiply.txt", "two\n")
    write(tmp_path / "flip_p.txt", "1.5")
    write(tmp_path / "global.yaml", "tags: 7\n")
    write(tmp_path / "batch_id.txt", "group")
    save_image(tmp_path / "img_1.png")

    result = scan(str(tmp_path))

    [rec] = result.records   # still trains, with the usable folder files only
    assert (str(rec.caption), rec.multiply, rec.flip_p, rec.batch_id) == ("img", 1.0, None, "group")
    problems = dict(result.problems)
    # the summary line names the file; the reason gives the line
    assert problems[str(tmp_path / "local.yaml")].startswith("line 2: not valid YAML")
    assert problems[str(tmp_path / "multiply.txt")].startswith("line 1: 'two' is not a number")
    assert problems[str(tmp_path / "flip_p.txt")].startswith("line 1: 1.5 is a probability")
    assert problems[str(tmp_path / "global.yaml")].startswith("line 1: key 'tags' must be a list")
    assert all(reason.endswith("(the file is ignored)") for reason in problems.values())
    summary = result.summary_lines()
    assert summary[0].startswith("4 file(s) skipped")
    assert len(summary) == 5 and all(str(tmp_path) in line for line in summary[1:])


def test_multiply_zero_means_one_with_a_warning(tmp_path):
    save_image(tmp_path / "a.png")
    write(tmp_path / "multiply.txt", "0")

    result = scan(str(tmp_path))

    assert result.records[0].multiply == 1.0
    assert "multiply 0 means 1" in result.summary_lines()[0]


def test_multipliers_below_one_image_per_epoch_is_an_error(tmp_path):
    save_image(tmp_path / "a.png")
    write(tmp_path / "multiply.txt", "0.4")
    result = scan(str(tmp_path))
    with pytest.raises(DataError, match="add up to 0.4: less than one image per epoch"):
        result.require_images()


def test_empty_captions_are_reported(tmp_path):
    save_image(tmp_path / "cat_1.png")
    write(tmp_path / "cat_1.txt", "  \n")
    save_image(tmp_path / "_2.png")     # the file name gives no text either

    result = scan(str(tmp_path))

    recs = by_name(result)
    assert str(recs["cat_1.png"].caption) == "cat" and str(recs["_2.png"].caption) == ""
    lines = result.summary_lines()
    assert any("cat_1.txt: empty caption file" in line for line in lines)
    assert any("_2.png: empty caption" in line and "unconditional" in line for line in lines)


# ---------------------------------------------------------------- manifests

def test_manifest(tmp_path, monkeypatch):
    images = tmp_path / "images"
    for name in ("a.jpg", "b.jpg", "c_3.png", "d.png"):
        save_image(images / name)
    write(images / "multiply.txt", "5")            # folder files do not apply to manifests
    manifest = write(tmp_path / "lists" / "train.json", json.dumps([
        {"image": "images/a.jpg", "main_prompt": "from cwd", "tags": ["t1", {"tag": "t0", "weight": 2}],
         "multiply": 2},
        {"image": "../images/b.jpg", "caption": "from manifest folder, t2", "batch_id": "grp"},
        {"image": str(images / "c_3.png")},
        {"main_prompt": "no image key"},
        {"image": "images/missing.jpg"},
        "not a mapping",
        {"image": "images/d.png", "flip_p": "high"},
    ], indent=1))
    monkeypatch.chdir(tmp_path)

    result = scan(str(manifest))

    recs = by_name(result)
    assert sorted(recs) == ["a.jpg", "b.jpg", "c_3.png"]
    assert (str(recs["a.jpg"].caption), recs["a.jpg"].multiply) == ("from cwd, t0, t1", 2.0)
    assert (str(recs["b.jpg"].caption), recs["b.jpg"].batch_id) == ("from manifest folder, t2", "grp")
    assert (str(recs["c_3.png"].caption), recs["c_3.png"].multiply) == ("c", 1.0)
    problems = dict(result.problems)
    assert len(problems) == 4
    assert "no 'image' key" in problems[f"{manifest} (entry 4)"]
    assert "images/missing.jpg' not found" in problems[f"{manifest} (entry 5)"]
    assert "must be a mapping" in problems[f"{manifest} (entry 6)"]
    assert re.search(r"line \d+ \(entry 7\): key 'flip_p' must be a number", problems[f"{manifest} (entry 7)"])


@pytest.mark.parametrize("content,message", [
    ('{"image": "a.jpg"}', "must be a JSON array"),
    ('[{"image": "a.jpg"},\n {"image": }]', "line 2: not valid JSON"),
])
def test_unusable_manifest_is_a_data_error(tmp_path, content, message):
    manifest = write(tmp_path / "m.json", content)
    with pytest.raises(DataError, match=message):
        scan(str(manifest))


# ---------------------------------------------------------------- bad image files

def png_header_only(path, width, height):
    """A PNG whose header claims width x height but holds almost no data: a decompression bomb."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_bad_image_files_are_skipped_each_with_a_reason(tmp_path):
    save_image(tmp_path / "good.jpg")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not a png")
    save_image(tmp_path / "cut.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes()[:60])
    png_header_only(tmp_path / "bomb.png", 40_000, 40_000)          # 1600 megapixels
    side = int((MAX_IMAGE_PIXELS * 1.5) ** 0.5)                      # between PIL's warning and error limits
    png_header_only(tmp_path / "big.png", side, side)
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")

    result = scan(str(tmp_path))

    assert [os.path.basename(r.path) for r in result.records] == ["good.jpg"]
    reasons = skipped(result)
    assert set(reasons) == {"zero.jpg", "text.png", "cut.jpg", "bomb.png", "big.png", "link.png"}
    assert "broken link" in reasons["link.png"]
    assert reasons["zero.jpg"].startswith("empty file (0 bytes)")
    assert reasons["text.png"].startswith("not a readable image")
    assert "cannot read the image" in reasons["cut.jpg"]
    for name in ("bomb.png", "big.png"):
        assert "decompression bombs; downscale it" in reasons[name]
    assert "megapixels" in reasons["big.png"]
    summary = result.summary_lines()
    assert summary[0] == "6 file(s) skipped (the rest of the dataset trains):"
    assert len(summary) == 7   # each file once


def test_large_scans_run_in_worker_processes_with_the_same_result(tmp_path, monkeypatch):
    for i in range(30):
        save_image(tmp_path / f"part{i % 3}" / f"img_{i:02d}.jpg", size=(64 + i, 48))
        write(tmp_path / f"part{i % 3}" / f"img_{i:02d}.txt", f"image {i}, tag{i % 4}")
    write(tmp_path / "part1" / "multiply.txt", "2")
    (tmp_path / "part2" / "broken.jpg").write_bytes(b"junk")
    write(tmp_path / "part2" / "img_02.yaml", "cond_droput: 1\n")

    serial = scan(str(tmp_path))
    monkeypatch.setattr(scan_module, "PARALLEL_MIN_IMAGES", 1)
    monkeypatch.setattr(scan_module, "_CHUNK", 4)
    parallel = scan(str(tmp_path))

    assert len(serial.records) == 30
    assert parallel.records == serial.records
    assert parallel.problems == serial.problems and parallel.summary_lines() == serial.summary_lines()


def exif_block(orientation: int, big_endian: bool) -> bytes:
    """An APP1 Exif payload with one Orientation entry, in either byte order."""
    e = ">" if big_endian else "<"
    tiff = (b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", 1) \
        + struct.pack(e + "HHI", 0x0112, 3, 1) + struct.pack(e + "HH", orientation, 0) + struct.pack(e + "I", 0)
    return b"Exif\x00\x00" + tiff


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_header_reader_agrees_with_pil(tmp_path, mode):
    from data.images import exif_orientation

    cases = []
    for orientation in (None, 1, 3, 6, 8):
        for progressive in (False, True):
            for big_endian in (False, True):
                path = tmp_path / f"{orientation}{progressive}{big_endian}.jpg"
                extra = {} if orientation is None else {"exif": exif_block(orientation, big_endian)}
                Image.new(mode, (53, 37)).save(path, progressive=progressive, **extra)
                cases.append(path)
    for path in cases:
        with open(path, "rb") as f:
            mine = scan_module.jpeg_header(f)
        with Image.open(path) as img:
            assert mine == (*img.size, exif_orientation(img)), path
    assert {scan_module.oriented_size(str(p)) for p in cases} == {(53, 37), (37, 53)}
    # not a JPEG inside, or cut before its frame header: left to PIL, which reads or rejects it
    save_image(tmp_path / "png_inside.jpg", size=(20, 10), format="PNG")
    (tmp_path / "cut.jpg").write_bytes(cases[0].read_bytes()[:30])
    for name in ("png_inside.jpg", "cut.jpg"):
        with open(tmp_path / name, "rb") as f:
            assert scan_module.jpeg_header(f) is None
    assert scan_module.oriented_size(str(tmp_path / "png_inside.jpg")) == (20, 10)
    with pytest.raises(OSError):
        scan_module.oriented_size(str(tmp_path / "cut.jpg"))
