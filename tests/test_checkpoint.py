"""Atomic writes and findlast, on real folders."""
from __future__ import annotations

import os
import time

import pytest

from utils.run.checkpoint import atomic_dir, atomic_file, checkpoint_name, find_last


def test_interrupted_folder_save_leaves_nothing_under_the_final_name(tmp_path):
    final = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as scratch:
            (scratch / "unet.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert not final.exists() and not list(tmp_path.iterdir())


def test_folder_save_replaces_an_older_one_only_when_complete(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as scratch:
        (scratch / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as scratch:
            (scratch / "a").write_text("broken")
            raise RuntimeError("disk full")
    assert (final / "a").read_text() == "old"
    with atomic_dir(final) as scratch:
        (scratch / "a").write_text("new")
    assert (final / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_file_save_is_atomic(tmp_path):
    final = tmp_path / "sub" / "model.safetensors"
    with pytest.raises(OSError):
        with atomic_file(final) as scratch:
            scratch.write_bytes(b"partial")
            raise OSError("no space left on device")
    assert not final.exists() and not list(final.parent.iterdir())
    with atomic_file(final) as scratch:
        scratch.write_bytes(b"complete")
    assert final.read_bytes() == b"complete"


def test_checkpoint_names():
    assert checkpoint_name("proj", 3, 42) == "proj-ep03-gs00042"
    assert checkpoint_name("proj", 30, 123456, prefix="last-") == "last-proj-ep30-gs123456"


def make_ckpt(path, age_seconds):
    path.mkdir(parents=True)
    index = path / "model_index.json"
    index.write_text("{}")
    stamp = time.time() - age_seconds
    os.utime(index, (stamp, stamp))
    return path


def test_find_last_picks_the_newest_complete_checkpoint(tmp_path):
    older = make_ckpt(tmp_path / "run1" / "ckpts" / "p-ep01-gs00010", 100)
    newest = make_ckpt(tmp_path / "run2" / "ckpts" / "last-p-ep02-gs00020", 50)
    make_ckpt(tmp_path / "run2" / "ckpts" / "last-p-ep02-gs00020_ema", 10)
    make_ckpt(tmp_path / "run2" / "ckpts" / "p-ep03-gs00030.partial", 5)
    assert find_last(tmp_path) == newest
    make_ckpt(tmp_path / "run3" / "ckpts" / "errored-p-ep00-gs00005", 1)
    with pytest.raises(FileNotFoundError, match="saved after an error"):
        find_last(tmp_path)
    assert older.exists()
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        find_last(tmp_path / "empty")
