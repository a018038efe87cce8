"""EveryDream2 habits (issue #17): findlast's scope. Whole runs: tests/e2e/test_ed2_habits_run.py."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from utils.options import config
from utils.run.checkpoint import find_last, find_last_for


@pytest.fixture
def paths(tmp_path, small_dataset):
    model = tmp_path / "model"
    model.mkdir()
    return {"resume_ckpt": str(model), "data_root": str(small_dataset)}


def base_argv(paths: dict) -> list[str]:
    return ["--resume_ckpt", paths["resume_ckpt"], "--data_root", paths["data_root"]]


# ---------------------------------------------------------------- findlast

def checkpoint(folder: Path, age_seconds: float) -> Path:
    folder.mkdir(parents=True)
    index = folder / "model_index.json"
    index.write_text("{}")
    stamp = os.path.getmtime(index) - age_seconds
    os.utime(index, (stamp, stamp))
    return folder


def test_findlast_searches_the_whole_logdir_unless_scoped_to_the_project(tmp_path):
    mine = checkpoint(tmp_path / "a_20250101-120000" / "ckpts" / "last-a-ep01-gs00004", 30)
    mine_ema = checkpoint(tmp_path / "a_20250101-120000" / "ckpts" / "last-a-ep01-gs00004_ema", 30)
    checkpoint(tmp_path / "a_20250101-120000-2" / "ckpts" / "a-ep00-gs00002", 40)
    other = checkpoint(tmp_path / "a_b_20250102-120000" / "ckpts" / "last-a_b-ep01-gs00004", 20)  # another project
    newest = checkpoint(tmp_path / "chain2_20250103-120000" / "ckpts" / "last-chain2-ep01-gs00004", 10)
    assert find_last(tmp_path) == newest
    assert find_last(tmp_path, "a") == mine  # not a_b's, though its folder starts with "a_"
    assert find_last(tmp_path, "a_b") == other
    assert find_last(tmp_path, "a", ema=True) == mine_ema
    with pytest.raises(FileNotFoundError, match="in runs of project 'zzz' .*set it to 'logdir' to search every run"):
        find_last(tmp_path, "zzz")

    def args(scope):
        return SimpleNamespace(logdir=str(tmp_path), project_name="a", findlast_scope=scope)
    assert find_last_for(args("logdir")) == newest
    assert find_last_for(args("project")) == mine
    assert find_last_for(args("logdir"), ema=True) == find_last_for(args("project"), ema=True) == mine_ema


def test_findlast_scope_is_an_option(paths):
    assert config.load(base_argv(paths)).findlast_scope == "logdir"
    assert config.load(base_argv(paths) + ["--findlast_scope", "project"]).findlast_scope == "project"
    with pytest.raises(SystemExit):
        config.load(base_argv(paths) + ["--findlast_scope", "everywhere"])


