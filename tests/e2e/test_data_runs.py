"""End to end: a dataset using every convention of doc/DATA.md, with bad files mixed in, trains through
train.py; its batch schedules and console output are checked as a user would read them.

The command is the one a user would run:
    python train.py --resume_ckpt demo/tiny-sd --data_root <dataset> --resolution 128 --batch_size 2
        --max_epochs 2 --optimizer_config cfgs/tiny_optimizer.json --sample_steps 0 --write_schedule --logdir <dir>
plus --flip_p 1 (so the folder and sidecar values that override it show), --cond_dropout 0 (so only the
per-image value drops captions) and --keep_tags 1.
"""
from __future__ import annotations

import contextlib
import io
import re
import struct
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

LINE = re.compile(r"step:(\d{5}), wh:\[(\d+), (\d+)\], r:(\d+), path:(/.+), batch_id:(.+), flip:([01]), "
                  r"caption:(.*)")


def image(path: Path, size=(128, 128), mode="RGB", seed=0, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, **save)
    return path


def text(path: Path, content: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def build_dataset(root: Path) -> None:
    text(root / "global.yaml", "tags: [dataset]\n")
    image(root / "cat_01.png", seed=1)
    text(root / "cat_01.txt", "a cat, sitting")
    image(root / "cat_02.jpg", seed=2)
    text(root / "cat_02.caption", "a cat, lying")
    image(root / "dog_01.png", seed=3)
    text(root / "dog_01.yaml", "main_prompt: a dog\ntags: [brown]\nflip_p: 0\nmultiply: 2\n")
    image(root / "bird_01.webp", seed=4)
    text(root / "bird_01.json", '{"main_prompt": "a bird", "cond_dropout": 1}')
    image(root / "red square_03.bmp", seed=5)                       # caption from the file name
    image(root / "empty_1.png", seed=6)
    text(root / "empty_1.txt", "")                                  # empty caption file: file name used
    image(root / "small.png", size=(40, 40), seed=7)                # smaller than its bucket
    text(root / "small.txt", "a small thing")
    # stored 192x128 with EXIF orientation 6 (rotate 90): displayed 128x192, a portrait bucket
    exif = Image.Exif()
    exif[0x0112] = 6
    image(root / "rotated.jpg", size=(192, 128), seed=8, exif=exif)
    text(root / "rotated.txt", "a rotated photo")
    image(root / "modes" / "cmyk.jpg", mode="CMYK", seed=9)
    image(root / "modes" / "palette.png", mode="P", seed=10)
    image(root / "modes" / "grey.png", mode="L", seed=11)
    image(root / "modes" / "alpha.png", mode="RGBA", seed=12)
    Image.fromarray(np.full((128, 128), 40000, np.uint16)).save(root / "modes" / "grey16.png")
    text(root / "modes" / "local.yaml", "main_prompt: an odd mode\n")
    # a named batch group of landscape images, repeated 1.5 times, never flipped
    for n in range(3):
        image(root / "wide" / f"w{n}.jpg", size=(192, 128), seed=20 + n)
    text(root / "wide" / "batch_id.txt", "wide group\n")
    text(root / "wide" / "flip_p.txt", "0")
    text(root / "wide" / "multiply.txt", "1.5")
    text(root / "wide" / "local.yaml", "main_prompt: a wide view\n")
    image(root / "wide" / "sub" / "ws.jpg", size=(192, 128), seed=24)  # folder files are not inherited
    # tags shuffled by the folder, the first kept in place by --keep_tags 1
    for n in range(2):
        image(root / "tall" / f"t{n}.png", size=(128, 192), seed=30 + n)
    text(root / "tall" / "local.yaml", "main_prompt: a tall thing\nshuffle_tags: true\ntags: [t1, t2, t3, t4]\n")
    # bad input
    (root / "bad").mkdir()
    (root / "bad" / "zero.jpg").write_bytes(b"")
    (root / "bad" / "notimage.png").write_text("not an image")
    (root / "bad" / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
        ">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 99)) + chunk(b"IEND", b""))
    truncated = image(root / "bad" / "truncated.png", seed=40)
    truncated.write_bytes(truncated.read_bytes()[:5000])             # header fine, pixel data cut
    text(root / "bad" / "truncated.txt", "a truncated file")
    image(root / "bad" / "badyaml.png", seed=41)
    text(root / "bad" / "badyaml.yaml", "main_prompt: x\ntags: [a, b\n")
    text(root / "bad" / "multiply.txt", "many")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import train

    tmp = tmp_path_factory.mktemp("data_e2e")
    root = tmp / "dataset"
    build_dataset(root)
    console = io.StringIO()   # train.main logs to stdout (through tqdm.write, so bars stay intact)
    with contextlib.redirect_stdout(console):
        status = train.main(["--resume_ckpt", str(REPO / "demo" / "tiny-sd"), "--data_root", str(root),
                             "--resolution", "128", "--batch_size", "2", "--max_epochs", "2",
                             "--optimizer_config", str(REPO / "cfgs" / "tiny_optimizer.json"), "--sample_steps",
                             "0", "--write_schedule", "--logdir", str(tmp / "logs"), "--no_save_ckpt",
                             "--flip_p", "1", "--cond_dropout", "0", "--keep_tags", "1"])
    (run_dir,) = (tmp / "logs").iterdir()
    return {"status": status, "root": root, "run": run_dir, "log": console.getvalue().splitlines()}


def schedule(run, epoch):
    out = []
    for line in (run["run"] / f"ep{epoch}_batch_schedule.txt").read_text().splitlines():
        m = LINE.fullmatch(line)
        assert m, line
        out.append({"step": int(m[1]), "wh": (int(m[2]), int(m[3])), "r": int(m[4]), "name": str(
            Path(m[5]).relative_to(run["root"])), "batch_id": m[6], "flip": int(m[7]), "caption": m[8]})
    return out


def real_slots(lines):
    """Lines of real images: in a runt batch (r > 0) only the first r slots are."""
    by_step = defaultdict(list)
    for line in lines:
        by_step[line["step"]].append(line)
    return [line for step in by_step.values() for n, line in enumerate(step) if not step[0]["r"] or n < step[0]["r"]]


def test_training_completes(run):
    assert run["status"] == 0
    assert any(line.startswith("Done:") for line in run["log"])


@pytest.mark.parametrize("epoch", [0, 1])
def test_schedule_shows_captions_repeats_buckets_groups_and_flips(run, epoch):
    lines = schedule(run, epoch)
    real = real_slots(lines)
    counts = Counter(line["name"] for line in real)
    expected_once = {"cat_01.png", "cat_02.jpg", "bird_01.webp", "red square_03.bmp", "empty_1.png", "small.png",
                     "rotated.jpg", "modes/cmyk.jpg", "modes/palette.png", "modes/grey.png", "modes/alpha.png",
                     "modes/grey16.png", "wide/sub/ws.jpg", "tall/t0.png", "tall/t1.png", "bad/truncated.png"}
    assert {n: c for n, c in counts.items() if n in expected_once} == dict.fromkeys(expected_once, 1)
    assert counts["dog_01.png"] == 2                                       # multiply 2
    assert all(counts[f"wide/w{n}.jpg"] in (1, 2) for n in range(3))       # multiply 1.5: whole part + a draw
    assert sum(counts.values()) == 22                                      # floor(16 + 2 + 4.5)
    assert not any(name.startswith("bad/") and name != "bad/truncated.png" for name in counts)

    for line in lines:
        name = line["name"]
        captions = {"cat_01.png": "a cat, sitting, dataset", "cat_02.jpg": "a cat, lying, dataset",
                    "dog_01.png": "a dog, brown, dataset", "bird_01.webp": " ", "small.png": "a small thing, dataset",
                    "red square_03.bmp": "red square, dataset", "empty_1.png": "empty, dataset",
                    "rotated.jpg": "a rotated photo, dataset", "wide/sub/ws.jpg": "ws, dataset"}
        if name in captions:
            assert line["caption"] == captions[name], line
        elif name.startswith("modes/"):
            assert line["caption"] == "an odd mode, dataset"
        elif name.startswith("wide/w"):
            assert line["caption"] == "a wide view, dataset"
        elif name.startswith("tall/"):
            parts = line["caption"].split(", ")
            assert parts[:2] == ["a tall thing", "t1"] and sorted(parts[2:]) == ["dataset", "t2", "t3", "t4"]
        # flips: --flip_p 1 unless the image's folder or sidecar says otherwise
        assert line["flip"] == (0 if name.startswith("wide/w") or name == "dog_01.png" else 1), line
        # buckets
        wh = {"wide": (160, 96), "tall": (96, 160), "rotated.jpg": (96, 160)}.get(name.split("/")[0], (128, 128))
        assert line["wh"] == wh, line
    # groups: a step never mixes batch ids; the named group holds only its own folder's images
    steps = defaultdict(set)
    for line in lines:
        steps[line["step"]].add((line["batch_id"], line["wh"]))
        if line["batch_id"] == "wide group":
            assert re.fullmatch(r"wide/w\d\.jpg", line["name"])
    assert all(len(ids) == 1 for ids in steps.values())
    assert any(line["batch_id"] == "wide group" for line in lines)


def test_tag_order_changes_between_epochs(run):
    def tall(epoch):
        return [line["caption"] for line in schedule(run, epoch) if line["name"].startswith("tall/")]

    assert tall(0) != tall(1)


def test_every_bad_input_gets_its_message_once(run):
    log = "\n".join(run["log"])
    root = run["root"]
    expected = {
        "bad/zero.jpg": "empty file (0 bytes)",
        "bad/notimage.png": "not a readable image",
        "bad/bomb.png": "decompression bombs; downscale it",
        "bad/badyaml.png": "badyaml.yaml line 3: not valid YAML",
        "bad/multiply.txt": "line 1: 'many' is not a number",
        "bad/truncated.png": "cannot decode the image",
    }
    for name, message in expected.items():
        mentions = [line for line in run["log"] if f"{root / name}:" in line and message in line]
        assert len(mentions) == 1, (name, mentions)
    assert "5 file(s) skipped" in log                       # the start-up summary; truncated.png is found later
    assert f"{root / 'empty_1.txt'}: empty caption file" in log
    undersized = (run["run"] / "undersized_images.txt").read_text().splitlines()
    assert undersized == [f"{root / 'small.png'}: 40x40, bucket 128x128"]
    assert any("1 image(s) are smaller than their bucket" in line for line in run["log"])
    # the dataset is never modified
    assert (root / "bad" / "zero.jpg").stat().st_size == 0 and (root / "bad" / "multiply.txt").read_text() == "many"
