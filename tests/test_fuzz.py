"""Seeded fuzzing of every reader of user files: train.json, optimizer.json, the validation config, and the
dataset's caption, sidecar, folder and manifest files.

The property under test is the trainer's promise about bad input (doc/GUARANTEES.md): each reader either
accepts a file, and then hands on values that are what they claim to be (the right type, finite, in range),
or stops with its own error type (ConfigError, or DataError / a per-file skip for dataset files) whose
message names the file. No other exception may escape.

The generator is a small seeded one (no extra dependency): random JSON values of every type, nested, with
the awkward ones over-represented (NaN and Infinity literals, numbers too large for a float or for Python's
int parser, lone surrogates, NUL characters, empty and huge strings, deep nesting), and random bytes, text
mutations, BOMs and invalid UTF-8 for the dataset files. A failure prints the seed and the case to replay.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import data
from data.captions import assemble_caption
from data.loader import EpochBatches, SampleOptions
from optimizer.optimizers import (DEFAULT_SETTINGS, TOP_LEVEL_KEYS, make_lr_schedule, make_optimizer,
                                  read_optimizer_file, resolve_settings)
from utils.options import config
from utils.model import shipped
from utils.options.config import ConfigError
from utils.options.flags import FLAGS
from utils.watch.validation import ALIASES, IGNORED_KEYS, KEYS, ValidationConfig, load_validation_config


class Raw(str):
    """JSON text written as is: literals the json module will not produce (huge integers, 1e999)."""


class Fuzz:
    """Seeded random JSON values, JSON text and file contents."""

    STRINGS = ["", " ", "true", "false", "null", "0", "-1", "1e3", "NaN", "Infinity", "none", "adamw", "cosine",
               "automatic", "sdp", "ddpm", "mse", "cpu", "findlast", ".", "..", "/", "a\u0000b", "\ud800",
               "caf\u00e9 \u65e5\u672c \U0001F600", "\u202eevil", "x" * 5000, "../" * 200 + "etc/passwd",
               "a: b", "- x", "{", "[1, 2]", "C:\\Windows\\", "\t\n\r"]
    FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.5, 1.5, -1.5, 1e308, -1e308, 5e-324, 0.999, 1.0000001]
    INTS = [0, 1, -1, 2, 3, 7, 64, 512, 999, 1000, 1001, 2**31, -2**31, 2**63, 10**30, -10**30]
    RAW = ["1e999", "-1e999", "9" * 5000, "-" + "9" * 400, "1" + "0" * 400 + ".5", "[" * 3000 + "]" * 3000,
           "{\"a\":" * 3000 + "1" + "}" * 3000, "NaN", "Infinity", "-Infinity"]

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def value(self, depth: int = 0):
        """A random JSON value (Raw for literal text), nested up to three levels."""
        kind = self.rng.choice(["none", "bool", "int", "float", "string", "string", "raw"] +
                               (["list", "object"] if depth < 3 else []))
        if kind == "none":
            return None
        if kind == "bool":
            return self.rng.random() < 0.5
        if kind == "int":
            return self.rng.choice(self.INTS + [self.rng.randint(-1000, 1000)])
        if kind == "float":
            return self.rng.choice(self.FLOATS + [self.rng.uniform(-10, 10), self.rng.random()])
        if kind == "string":
            return self.rng.choice([self.rng.choice(self.STRINGS), self.unicode_text(self.rng.randint(1, 40))])
        if kind == "raw":
            return Raw(self.rng.choice(self.RAW))
        if kind == "list":
            return [self.value(depth + 1) for _ in range(self.rng.randint(0, 4))]
        return {self.rng.choice(self.STRINGS[:20] + [self.unicode_text(5)]): self.value(depth + 1)
                for _ in range(self.rng.randint(0, 4))}

    def unicode_text(self, length: int) -> str:
        ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x2FF), (0x3040, 0x30FF), (0x4E00, 0x4E80), (0x1F300, 0x1F64F),
                  (0xD800, 0xDFFF), (0xFFF0, 0xFFFF)]
        out = []
        for _ in range(length):
            low, high = self.rng.choice(ranges)
            out.append(chr(self.rng.randint(low, high)))
        return "".join(out)

    def dumps(self, value) -> str:
        """JSON text of `value`, Raw literals inserted as they are, NaN/Infinity as the json module writes them."""
        if isinstance(value, Raw):
            return str(value)
        if isinstance(value, list):
            return "[" + ", ".join(self.dumps(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{json.dumps(k)}: {self.dumps(v)}" for k, v in value.items()) + "}"
        return json.dumps(value, ensure_ascii=self.rng.random() < 0.5)

    def mutate(self, text: bytes) -> bytes:
        """A few random byte edits of a valid file: what a half-saved or hand-mangled file looks like."""
        out = bytearray(text)
        for _ in range(self.rng.randint(1, 6)):
            edit = self.rng.choice(["flip", "insert", "delete", "cut", "duplicate"])
            at = self.rng.randint(0, len(out))
            if edit == "flip" and at < len(out):
                out[at] = self.rng.randrange(256)
            elif edit == "insert":
                out[at:at] = self.rng.choice([b"\x00", b"\xff", b"\xc3", b"\n", b":", b",", b"-", b"{", b"[", b"&a",
                                              b"*a", b"!!python/object:os.system", b"\"", b"'", b"#", b"\t"])
            elif edit == "delete":
                del out[at:at + self.rng.randint(1, 8)]
            elif edit == "cut":
                del out[at:]
            else:
                out[at:at] = out[:at][-self.rng.randint(1, 20):]
        return bytes(out)

    def file_bytes(self, valid: list[str]) -> bytes:
        """Contents for a text file whose well-formed versions look like one of `valid`."""
        kind = self.rng.choice(["random", "mutated", "mutated", "json", "text", "bom", "utf16", "nul", "huge"])
        if kind == "random":
            return self.rng.randbytes(self.rng.randint(0, 300))
        if kind == "mutated":
            return self.mutate(self.rng.choice(valid).encode())
        if kind == "json":
            return self.dumps(self.value()).encode("utf-8", "surrogatepass")
        if kind == "text":
            return self.unicode_text(self.rng.randint(0, 60)).encode("utf-8", "surrogatepass")
        if kind == "bom":
            return b"\xef\xbb\xbf" + self.rng.choice(valid).encode()
        if kind == "utf16":
            return self.rng.choice(valid).encode("utf-16")
        if kind == "nul":
            return self.rng.choice(valid).encode().replace(b" ", b"\x00")
        return (self.rng.choice(valid) + "x" * 200_000 + "\n").encode()


def assert_names(error: Exception, *names: str) -> None:
    message = str(error)
    assert any(name in message for name in names), f"{type(error).__name__} names none of {names}: {message}"


# ---------------------------------------------------------------- train.json

@pytest.fixture
def required_paths(tmp_path, small_dataset) -> dict:
    model = tmp_path / "model"
    model.mkdir()
    return {"resume_ckpt": str(model), "data_root": str(small_dataset)}


def check_accepted_options(args: SimpleNamespace) -> None:
    """An accepted train.json gives every option a value of its declared type, within its declared range."""
    for flag in FLAGS:
        value = getattr(args, flag.name)
        if value is None or flag.type is object:
            continue
        assert type(value) is flag.type, (flag.name, value)
        if flag.type is float:
            assert math.isfinite(value), (flag.name, value)
        if flag.choices:
            assert value in flag.choices, (flag.name, value)
        if flag.min is not None:
            assert value >= flag.min, (flag.name, value)
        if flag.max is not None:
            assert value <= flag.max, (flag.name, value)


def load_train_json(path: Path, text: bytes, *keys: str) -> SimpleNamespace | None:
    """Loads the file; a ConfigError must name the file or one of `keys`."""
    path.write_bytes(text)
    try:
        args = config.load(["--config", str(path)])
    except ConfigError as e:
        assert_names(e, str(path), *(f"'{key}'" for key in keys))
        return None
    check_accepted_options(args)
    return args


# Tried for every key besides the random ones: the values most likely to slip through a type or range check.
AWKWARD = [Raw("NaN"), Raw("-Infinity"), Raw("9" * 400), Raw("9" * 5000), -1, "", "a\u0000b", "\ud800", "x" * 5000,
           [1, 2]]


def test_every_train_json_key_with_awkward_and_random_values(tmp_path, required_paths):
    fuzz = Fuzz(1)
    path = tmp_path / "train.json"
    accepted = 0
    for flag in FLAGS:
        for value in AWKWARD + [fuzz.value()]:
            text = fuzz.dumps({**required_paths, flag.name: value})
            try:
                accepted += load_train_json(path, text.encode("utf-8", "surrogatepass"), flag.name) is not None
            except Exception:
                print(f"key {flag.name}: {text[:300]!r}")
                raise
    assert accepted > 30  # the generator also hits values that are fine (null, right-typed ones)


def test_train_json_with_random_bytes_and_mutations(tmp_path, required_paths):
    fuzz = Fuzz(3)
    path = tmp_path / "train.json"
    valid = [json.dumps({**required_paths, "batch_size": 4, "lr": 1e-6, "flip_p": 0.5, "lr_scheduler": "cosine"}),
             json.dumps(required_paths, indent=2)]
    for case in range(200):
        text = fuzz.file_bytes(valid)
        try:
            load_train_json(path, text, *(flag.name for flag in FLAGS))
        except Exception:
            print(f"case {case}: {text[:300]!r}")
            raise


# The crashes the fuzzing found, pinned down with the message each now gives. (file text, what it must say)
TRAIN_JSON_FOUND = {
    "NaN for a number": ('"lr": NaN', "key 'lr' is NaN; it must be a finite number"),
    "integer too big for a float": ('"cond_dropout": 1' + "0" * 400, "key 'cond_dropout' is 1000"),
    "integer of 5000 digits": ('"batch_size": ' + "9" * 5000, "JSON that cannot be read"),
    "nesting past the stack": ('"plugins": ' + "[" * 3000 + "]" * 3000, "JSON that cannot be read"),
    "name too long to look up": ('"resume_ckpt": "' + "x" * 5000 + '"', "does not exist"),
    "NUL in a path": ('"resume_ckpt": "model\\u0000.ckpt"', "holds a NUL character"),
    "lone surrogate": ('"project_name": "\\ud800"', "not half of a pair"),
    "empty data_root": ('"data_root": ""', "'data_root' is required"),
}


@pytest.mark.parametrize("name", TRAIN_JSON_FOUND)
def test_train_json_cases_fuzzing_found(tmp_path, required_paths, name):
    text, says = TRAIN_JSON_FOUND[name]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(required_paths)[:-1] + ", " + text + "}")
    with pytest.raises(ConfigError, match=re.escape(says)):
        config.load(["--config", str(path)])


def test_train_json_encodings(tmp_path, required_paths):
    path = tmp_path / "train.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(required_paths).encode())  # Notepad's BOM
    assert config.load(["--config", str(path)]).data_root == required_paths["data_root"]
    path.write_bytes(json.dumps(required_paths).encode()[:-1] + b', "run_name": "caf\xe9"}')  # Latin-1 e-acute
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not UTF-8 text")):
        config.load(["--config", str(path)])


# ---------------------------------------------------------------- optimizer.json

def main_options(**overrides) -> SimpleNamespace:
    values = dict(lr=None, lr_scheduler="constant", lr_warmup_steps=None, lr_decay_steps=None, max_epochs=3,
                  sources={}, scale_lr=False, batch_size=2, grad_accum=1)
    return SimpleNamespace(**{**values, **overrides})


def check_optimizer_file(path: Path, text: bytes) -> bool:
    """An accepted optimizer.json must resolve and build real optimizers and LR schedules: train.py reads the
    file before the model loads but builds from it only after, when an error would be too late."""
    path.write_bytes(text)
    try:
        file_data = read_optimizer_file(path)
    except ConfigError as e:
        assert_names(e, str(path))
        return False
    settings = resolve_settings(file_data, main_options(), steps_per_epoch=4)
    for resolved in settings.values():
        parameter = torch.nn.Parameter(torch.ones(3))
        optimizer = make_optimizer([parameter], resolved)
        schedule = make_lr_schedule(optimizer, resolved)
        parameter.grad = torch.ones(3)
        optimizer.step()
        schedule.step()
        assert all(math.isfinite(lr) and lr >= 0 for lr in schedule.get_last_lr())
    return True


def test_every_optimizer_json_key_with_awkward_and_random_values(tmp_path):
    fuzz = Fuzz(4)
    path = tmp_path / "optimizer.json"
    sections = {"base": {"optimizer": "adamw"}, "text_encoder_overrides": {}}
    cases = [(key, lambda v, key=key: {**sections, key: v}) for key in TOP_LEVEL_KEYS] + \
        [(f"{section}.{key}", lambda v, section=section, key=key: {**sections, section: {**sections[section], key: v}})
         for section in sections for key in DEFAULT_SETTINGS]
    accepted = 0
    for name, build in cases:
        for value in AWKWARD + [fuzz.value() for _ in range(6)]:
            text = fuzz.dumps(build(value))
            try:
                accepted += check_optimizer_file(path, text.encode("utf-8", "surrogatepass"))
            except Exception:
                print(f"key {name}: {text[:300]!r}")
                raise
    assert accepted > 20


def test_optimizer_json_with_random_bytes_and_mutations(tmp_path):
    fuzz = Fuzz(5)
    path = tmp_path / "optimizer.json"
    valid = [json.dumps({"doc": "x", "base": {"optimizer": "adamw", "lr": 2e-6, "betas": [0.9, 0.99],
                                              "lr_scheduler": "cosine"},
                         "text_encoder_overrides": {"lr": 1e-6, "weight_decay": 0.0}}, indent=1)]
    for case in range(300):
        text = fuzz.file_bytes(valid)
        try:
            check_optimizer_file(path, text)
        except Exception:
            print(f"case {case}: {text[:300]!r}")
            raise


OPTIMIZER_JSON_FOUND = {
    "section that is not an object": ('{"base": true}', "'base' must be an object of settings"),
    "betas not a pair": ('{"base": {"betas": 0.9}}', "base.betas must be two numbers in [0, 1)"),
    "unknown schedule": ('{"text_encoder_overrides": {"lr_scheduler": "cosine_annealing"}}',
                         "text_encoder_overrides.lr_scheduler must be one of constant"),
    "NaN learning rate": ('{"base": {"lr": NaN}}', "base.lr must be a number >= 0, got nan"),
    "huge learning rate": ('{"base": {"lr": 1e999999}}', "base.lr must be a number >= 0, got inf"),
    "fractional warmup": ('{"base": {"lr_warmup_steps": 2.5}}', "base.lr_warmup_steps must be a whole number"),
    "optimizer name that is not text": ('{"base": {"optimizer": ["adamw"]}}',
                                        "base.optimizer must be an optimizer name"),
}


@pytest.mark.parametrize("name", OPTIMIZER_JSON_FOUND)
def test_optimizer_json_cases_fuzzing_found(tmp_path, name):
    text, says = OPTIMIZER_JSON_FOUND[name]
    path = tmp_path / "optimizer.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {says}")):
        read_optimizer_file(path)


# ---------------------------------------------------------------- validation config

def check_validation_config(path: Path, text: bytes) -> bool:
    path.write_bytes(text)
    try:
        cfg = load_validation_config(path)
    except ConfigError as e:
        assert_names(e, str(path))
        return False
    assert isinstance(cfg, ValidationConfig)
    for name in ("auto_split_proportion", "stabilize_split_proportion"):
        assert 0 < getattr(cfg, name) < 1
    assert math.isfinite(cfg.every_n_epochs) and cfg.every_n_epochs > 0
    assert type(cfg.seed) is int and cfg.seed >= 0
    assert cfg.batch_size is None or type(cfg.batch_size) is int and cfg.batch_size >= 1
    assert cfg.val_split_mode in ("automatic", "manual", "none")
    for name in ("validate_training", "stabilize_training_loss", "use_relative_loss"):
        assert type(getattr(cfg, name)) is bool
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in cfg.extra_manual_datasets.items())
    return True


def test_every_validation_key_with_awkward_and_random_values(tmp_path, small_dataset):
    fuzz = Fuzz(6)
    path = tmp_path / "validation.json"
    keys = KEYS + tuple(ALIASES) + IGNORED_KEYS
    accepted = 0
    for key in keys:
        for value in AWKWARD + [fuzz.value() for _ in range(10)]:
            if key in ("manual_data_root", "val_data_root") and fuzz.rng.random() < 0.3:
                value = str(small_dataset)
            text = fuzz.dumps({"val_split_mode": "automatic", key: value})
            try:
                accepted += check_validation_config(path, text.encode("utf-8", "surrogatepass"))
            except Exception:
                print(f"key {key}: {text[:300]!r}")
                raise
    assert accepted > 20


def test_validation_config_with_random_bytes_and_mutations(tmp_path, small_dataset):
    fuzz = Fuzz(7)
    path = tmp_path / "validation.json"
    valid = [json.dumps({"documentation": {"a": "b"}, "validate_training": True, "val_split_mode": "manual",
                         "manual_data_root": str(small_dataset), "auto_split_proportion": 0.15,
                         "stabilize_training_loss": False, "every_n_epochs": 1, "seed": 555,
                         "extra_manual_datasets": {"more": str(small_dataset)}}, indent=2)]
    for case in range(300):
        text = fuzz.file_bytes(valid)
        try:
            check_validation_config(path, text)
        except Exception:
            print(f"case {case}: {text[:300]!r}")
            raise


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1" + "0" * 400])
def test_validation_every_n_epochs_must_be_finite(tmp_path, value):
    """NaN used to be accepted and crash the run at the first validation check, after hours of training."""
    path = tmp_path / "validation.json"
    path.write_text('{"every_n_epochs": %s}' % value)
    says = f"{path}: key 'every_n_epochs' is {value}; it must be a finite number"
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_validation_config(path)


# ---------------------------------------------------------------- dataset files

CAPTION_TEXT = ["a red square, bright, flat colour", "a photo of a cat", "tags only, one, two, , three,"]
YAML_TEXT = ["main_prompt: a red square\ntags:\n  - tag: bright\n    weight: 1.5\n  - flat\nmultiply: 2\n"
             "flip_p: 0.5\ncond_dropout: 0.1\nloss_scale: 0.8\nrating: 2\nbatch_id: reds\nshuffle_tags: true\n"
             "max_caption_length: 30\n",
             "caption:\n  main_prompt: a cat\n  tags: [sitting, window]\ncaption_ref: &a {x: 1}\n",
             "main_prompt: [first, second]\ntags: 'a, b, c'\n"]
JSON_TEXT = ['{"main_prompt": "a red square", "tags": [{"tag": "bright", "weight": 2}, "flat"], "multiply": 0.5}',
             '{"caption": "a cat, sitting", "flip_p": 1, "batch_id": "cats"}']
NUMBER_TEXT = ["0.5\n", "2", "1.0\n\n", "  0  "]

# (file to write relative to the dataset root, its well-formed versions)
DATASET_FILES = [
    ("img.txt", CAPTION_TEXT), ("img.caption", CAPTION_TEXT), ("img.yaml", YAML_TEXT), ("img.yml", YAML_TEXT),
    ("img.json", JSON_TEXT + YAML_TEXT), ("multiply.txt", NUMBER_TEXT), ("flip_p.txt", NUMBER_TEXT),
    ("cond_dropout.txt", NUMBER_TEXT), ("loss_scale.txt", NUMBER_TEXT), ("batch_id.txt", CAPTION_TEXT),
    ("local.yaml", YAML_TEXT), ("local.yml", YAML_TEXT), ("../global.yaml", YAML_TEXT),
    ("shuffle_tags.txt", CAPTION_TEXT),
]


@pytest.fixture(scope="module")
def tokenizer():
    return shipped.load_tokenizer("sd1")


def check_records(result: data.ScanResult) -> None:
    """What an accepted dataset hands to training: finite numbers in range, text captions, a positive budget."""
    for r in result.records:
        assert isinstance(r.caption.main_prompt, str) and all(isinstance(t.text, str) for t in r.caption.tags)
        assert all(math.isfinite(t.weight) and t.weight > 0 for t in r.caption.tags)
        assert math.isfinite(r.multiply) and r.multiply >= 0
        assert math.isfinite(r.loss_scale) and math.isfinite(r.rating) and r.rating > 0
        for p in (r.flip_p, r.cond_dropout):
            assert p is None or 0 <= p <= 1
        assert type(r.max_caption_length) is int and r.max_caption_length >= 1
        assert isinstance(r.batch_id, str) and r.batch_id
        assert type(r.shuffle_tags) is bool


def scan_checked(root: Path) -> str:
    """Scans `root`; returns "trains" (with records checked), "skips" (an image or file left out with a
    reason) or "refused" (a DataError naming the data root)."""
    try:
        result = data.scan(str(root))
        result.require_images()
    except data.DataError as e:
        assert_names(e, str(root.resolve()), str(root))
        return "refused"
    check_records(result)
    for path, reason in result.problems:
        assert path and reason and len(reason) < 10_000  # named, said why, and no file quoted whole
    result.summary_lines()
    return "skips" if result.problems else "trains"


def build_captions(root: Path, tokenizer) -> None:
    """The loader's per-sample caption building (tags shuffled, drawn by weight, dropped) and tokenizing."""
    records = data.assign_buckets(data.scan(str(root)).records, 128)
    plan = data.build_epoch_batches(records, 1, seed=0, epoch=0)
    batches = EpochBatches(plan, records, tokenizer, SampleOptions(cond_dropout=0.3, shuffle_tags=True, keep_tags=1),
                           seed=0, epoch=0)
    for step in range(len(batches)):
        assert batches[step]["input_ids"].shape == (1, tokenizer.model_max_length)
    for record in records:
        for shuffle in (False, True):
            assert isinstance(assemble_caption(record.caption, shuffle, 1, record.max_caption_length,
                                               random.Random(0)), str)


def fuzz_dataset(seed: int, tmp_path: Path, tokenizer, cases: int, write_case) -> dict[str, int]:
    """Runs `write_case(fuzz, folder) -> (data_root, what was written)` `cases` times; counts the outcomes.
    Every accepted caption is tokenized; every eighth accepted dataset goes through the whole loader."""
    fuzz = Fuzz(seed)
    outcomes = {"trains": 0, "skips": 0, "refused": 0}
    for case in range(cases):
        folder = tmp_path / f"case{case}"
        folder.mkdir()
        root, written = write_case(fuzz, folder)
        try:
            outcome = scan_checked(root)
            if outcome != "refused":
                tokenizer([r.caption.text() for r in data.scan(str(root)).records])
            if outcome != "refused" and case % 8 == 0:
                build_captions(root, tokenizer)
        except Exception:
            print(f"case {case}: {written!r}")
            raise
        outcomes[outcome] += 1
        shutil.rmtree(folder)
    return outcomes


def image_file(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), colour).save(path)
    return path


def test_dataset_files_with_random_contents(tmp_path, tokenizer):
    def write_case(fuzz: Fuzz, folder: Path):
        root = folder / "data"
        image_file(root / "img.png")
        written = []
        for _ in range(fuzz.rng.choice([1, 1, 2, 3])):
            name, valid = fuzz.rng.choice(DATASET_FILES)
            contents = fuzz.file_bytes(valid)
            (root / name).write_bytes(contents)
            written.append((name, contents[:200]))
        return root, written

    outcomes = fuzz_dataset(8, tmp_path, tokenizer, 400, write_case)
    assert outcomes["trains"] > 50 and outcomes["skips"] > 50, outcomes


def test_yaml_and_json_sidecars_with_random_values_for_every_key(tmp_path, tokenizer):
    keys = data.settings.SCHEMA_KEYS + ("cond_droput", "unknown")

    def write_case(fuzz: Fuzz, folder: Path):
        image_file(folder / "img.png", (30, 30, 200))
        mapping = {fuzz.rng.choice(keys): fuzz.value() for _ in range(fuzz.rng.randint(1, 3))}
        name = fuzz.rng.choice(["img.json", "img.yaml", "local.yaml", "global.yaml"])
        text = fuzz.dumps(mapping)  # JSON is YAML too, bar NaN/Infinity, which YAML reads as text
        (folder / name).write_bytes(text.encode("utf-8", "surrogatepass"))
        return folder, (name, text[:300])

    outcomes = fuzz_dataset(9, tmp_path, tokenizer, 300, write_case)
    assert outcomes["trains"] > 30 and outcomes["skips"] > 30, outcomes


def test_manifests_with_random_contents(tmp_path, tokenizer):
    image = image_file(tmp_path / "image.png", (30, 200, 30))
    valid = [json.dumps([{"image": str(image), "main_prompt": "a green square", "tags": ["flat"], "multiply": 2},
                         {"image": "image.png", "caption": "green, square"}])]

    def write_case(fuzz: Fuzz, folder: Path):
        if fuzz.rng.random() < 0.7:
            entries = [{"image": fuzz.rng.choice([str(image), "../image.png", fuzz.value()]),
                        **({fuzz.rng.choice(data.settings.SCHEMA_KEYS): fuzz.value()} if fuzz.rng.random() < 0.7
                           else {})}
                       for _ in range(fuzz.rng.randint(0, 4))]
            text = fuzz.dumps(fuzz.rng.choice([entries] * 4 + [fuzz.value()])).encode("utf-8", "surrogatepass")
        else:
            text = fuzz.file_bytes(valid)
        manifest = folder / "manifest.json"
        manifest.write_bytes(text)
        return manifest, text[:300]

    outcomes = fuzz_dataset(10, tmp_path, tokenizer, 300, write_case)
    assert min(outcomes.values()) > 15, outcomes


# (file, its text, what the skip reason must say)
DATASET_FOUND = {
    "infinite multiply": ("multiply.txt", "inf\n", "'inf' is not a finite number"),
    "NaN loss_scale": ("loss_scale.txt", "nan", "'nan' is not a finite number"),
    "lone surrogate in JSON": ("img.json", '{"main_prompt": "a \\ud800 cat"}', "not half of a pair"),
    "integer of 5000 digits": ("img.json", '{"multiply": ' + "9" * 5000 + "}", "cannot be read"),
    "integer too big for a float": ("img.yaml", "rating: 1" + "0" * 400, "must be a finite number, got a huge"),
}


@pytest.mark.parametrize("name", DATASET_FOUND)
def test_dataset_cases_fuzzing_found(tmp_path, name):
    file, text, says = DATASET_FOUND[name]
    image_file(tmp_path / "img.png")
    (tmp_path / file).write_text(text)
    result = data.scan(str(tmp_path))
    reasons = dict(result.problems)
    reason = reasons.get(str(tmp_path / file)) or reasons.get(str(tmp_path / "img.png"))
    assert reason and says in reason, result.problems


def test_image_file_names_that_are_not_utf8(tmp_path, tokenizer):
    """Names made on other systems (Latin-1, Shift-JIS, or any bytes) reach Python with their stray bytes as
    surrogates, which no tokenizer or UTF-8 file takes. The caption from the name is decoded like a caption
    file; the schedule and the undersized list write the names back as their own bytes."""
    fuzz = Fuzz(11)
    root = tmp_path / "data"
    root.mkdir()
    names = [b"caf\xe9, sitting_01", b"\x83e\x83X\x83g", b"n" + fuzz.rng.randbytes(16).translate(None, b"/\x00")]
    for name in names:
        try:
            image_file(Path(os.fsdecode(os.fsencode(root) + b"/" + name + b".png")))
        except OSError:
            pytest.skip("this file system takes only UTF-8 names")
    result = data.scan(str(root))
    records = data.assign_buckets(result.records, 128)
    assert len(records) == 3 and not result.problems
    captions = sorted(r.caption.text() for r in records)
    assert "caf\u00e9, sitting" in captions
    build_captions(root, tokenizer)
    batches = EpochBatches(data.build_epoch_batches(records, 1, seed=0, epoch=0), records, tokenizer,
                           SampleOptions(), seed=0, epoch=0)
    data.write_schedule(tmp_path / "schedule.txt", batches)
    data.report_undersized(records, tmp_path)
    for written in (tmp_path / "schedule.txt", tmp_path / "undersized_images.txt"):
        assert all(name in written.read_bytes() for name in names), written


LAUGHS = "".join(f"{a}: &{a} [{', '.join([f'*{b}'] * 9)}]\n" for b, a in zip("abcdefg", "bcdefgh"))
HOSTILE_YAML = {
    "an alias that contains itself": "&a {main_prompt: cat, caption: *a}\n",
    "a caption mapping that contains itself": "caption: &c\n  tags: [x]\n  caption: *c\n",
    "billion laughs as tags": "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + LAUGHS + "tags: *h\n",
    "billion laughs as main_prompt": "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + LAUGHS +
                                     "main_prompt: *h\n",
    "python object": "!!python/object/apply:os.system [touch {marker}]\n",
    "python name": "main_prompt: !!python/name:os.system\n",
    "nesting deeper than the stack": "[" * 100_000 + "]" * 100_000,
    "integer of 5000 digits": "multiply: " + "9" * 5000 + "\n",
}


@pytest.mark.parametrize("name", HOSTILE_YAML)
def test_hostile_yaml_is_skipped_with_a_short_reason(tmp_path, name):
    """Known attacks on YAML readers: the image is skipped, the reason names the file and stays short (the
    billion-laughs structures hold 9^8 items: quoting them whole would take minutes and gigabytes), and no
    code runs."""
    image = image_file(tmp_path / "img.png")
    marker = tmp_path / "pwned"
    (tmp_path / "img.yaml").write_text(HOSTILE_YAML[name].replace("{marker}", str(marker)))
    result = data.scan(str(tmp_path))
    ((path, reason),) = result.problems
    assert path == str(image) and str(tmp_path / "img.yaml") in reason and len(reason) < 500, reason
    assert not result.records and not marker.exists()
