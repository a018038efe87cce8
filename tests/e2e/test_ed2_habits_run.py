"""EveryDream2 habits in real runs of train.py (issue #17): a chain of runs whose links change project_name continues
through `findlast` (EveryDream2's chaining guide), run_name names the run and not its folder, legacy switches on the
command line, a Hugging Face id or a precision the device cannot run stops before anything is made, and a machine
whose NVIDIA GPU torch cannot use stops with the install command unless allow_cpu."""
from __future__ import annotations

import json
import re
import stat
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL, write_json


def train(tmp_path: Path, data_root: Path, *flags: str) -> int:
    import train as train_module

    optimizer = write_json(tmp_path / "optimizer.json", {"base": {"optimizer": "adamw", "lr": 1e-3,
                                                                  "lr_scheduler": "constant"}})
    return train_module.main(["--resume_ckpt", str(TINY_MODEL), "--data_root", str(data_root), "--resolution", "64",
                              "--batch_size", "4", "--max_epochs", "1", "--logdir", str(tmp_path / "logs"),
                              "--sample_steps", "0", "--no_save_ckpt", "--optimizer_config", str(optimizer),
                              "--seed", "3", *flags])


def console(capsys) -> str:
    """What the run printed since the last call (train.py logs to the console through tqdm)."""
    captured = capsys.readouterr()
    return captured.out + captured.err


def text_summaries(run: Path) -> dict[str, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"tensors": 0}).Reload()
    return {tag.split("/")[0]: events.Tensors(tag)[0].tensor_proto.string_val[0].decode()
            for tag in events.Tags()["tensors"]}


def test_a_chain_of_runs_with_new_project_names_continues_through_findlast(tmp_path, small_dataset, capsys):
    logdir = tmp_path / "logs"
    assert train(tmp_path, small_dataset, "--project_name", "link0", "--run_name", "first try", "--amp",
                 "--useadam8bit", "--disable_xformers") == 0
    printed = console(capsys)
    (first,) = logdir.iterdir()
    # run_name names the run, not its folder (EveryDream2: <project_name>-<timestamp>, here with an underscore).
    assert re.fullmatch(r"link0_\d{8}-\d{6}", first.name)
    assert json.loads((first / f"{first.name}_main.json").read_text())["run_name"] == "first try"
    assert "Run: first try (project link0)" in (first / f"{first.name}.log").read_text()
    texts = text_summaries(first)
    assert texts["run_name"] == "first try" and "run_name=first try" in texts["config"]
    # The legacy switches ran, each with its note.
    for name, replacement in (("amp", "mixed_precision"), ("useadam8bit", "adamw8bit"),
                              ("disable_xformers", "attn_type")):
        (note,) = [line for line in printed.splitlines() if f"'--{name}' is an EveryDream2 switch" in line]
        assert replacement in note
    (link0_last,) = (first / "ckpts").glob("last-link0-*")

    # The next link names another project: findlast scoped to it has nothing to start from and stops before
    # making anything ...
    assert train(tmp_path, small_dataset, "--project_name", "link1", "--resume_ckpt", "findlast",
                 "--findlast_scope", "project") == 2
    printed = console(capsys)
    assert "no checkpoint folder (with model_index.json) under" in printed and "in runs of project 'link1'" in printed
    assert list(logdir.iterdir()) == [first]
    # ... while findlast over the whole logdir, the default as in EveryDream2, continues from link0's checkpoint.
    assert train(tmp_path, small_dataset, "--project_name", "link1", "--resume_ckpt", "findlast") == 0
    assert f"resume_ckpt findlast: {link0_last}" in console(capsys)
    (second,) = logdir.glob("link1_*")
    assert f"from {link0_last}" in (second / f"{second.name}.log").read_text()  # "Model: ... from <checkpoint>"
    texts = text_summaries(second)
    assert texts["run_name"] == second.name  # no run_name: the run is called after its folder
    (link1_last,) = (second / "ckpts").glob("last-link1-*")
    # A third link finds link1's checkpoint, the newest of the logdir.
    assert train(tmp_path, small_dataset, "--project_name", "link2", "--resume_ckpt", "findlast") == 0
    assert f"resume_ckpt findlast: {link1_last}" in console(capsys)


def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path, small_dataset):
    from utils.options import config
    from utils.run.run_dir import RunDir

    args = config.load(["--resume_ckpt", str(TINY_MODEL), "--data_root", str(small_dataset), "--project_name",
                        "same", "--run_name", "r", "--logdir", str(tmp_path / "logs")])
    runs = [RunDir(args) for _ in range(3)]
    try:
        names = [run.name for run in runs]
        assert len(set(names)) == 3 and all(re.fullmatch(r"same_\d{8}-\d{6}(-\d)?", name) for name in names)
        assert [run.run_name for run in runs] == ["r"] * 3
    finally:
        for run in runs:
            run.close(0)


def test_a_hugging_face_id_or_a_precision_the_cpu_cannot_run_stops_before_anything_is_made(tmp_path, small_dataset,
                                                                                           capsys):
    assert train(tmp_path, small_dataset, "--resume_ckpt", "stabilityai/stable-diffusion-2-1-base") == 2
    printed = console(capsys)
    assert "error: command line: resume_ckpt 'stabilityai/stable-diffusion-2-1-base' is not a file or folder" in printed
    assert "nothing is downloaded by this trainer" in printed
    assert "hf download stabilityai/stable-diffusion-2-1-base --local-dir" in printed
    assert train(tmp_path, small_dataset, "--ema_decay_rate", "0.9", "--ema_decay_resume_model",
                 "someone/some-ema") == 2
    assert "ema_resume_model 'someone/some-ema' is not a file or folder" in console(capsys)
    if not torch.cuda.is_available():
        assert train(tmp_path, small_dataset, "--mixed_precision", "bf16") == 2
        assert "mixed_precision 'bf16' needs a CUDA GPU" in console(capsys)
    assert not (tmp_path / "logs").exists()


@pytest.mark.skipif(sys.platform == "win32" or torch.cuda.is_available(),
                    reason="needs a torch that cannot use CUDA, and a shell script standing in for nvidia-smi")
def test_an_nvidia_gpu_torch_cannot_use_stops_the_run_unless_allow_cpu(tmp_path, small_dataset, capsys,
                                                                       monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"  # the driver's tool, as on a machine with a GPU
    smi.write_text('#!/bin/sh\nif [ "$1" = "-L" ]; then echo "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-1)"; '
                   'else echo "| NVIDIA-SMI 560.35.03   Driver Version: 560.35.03   CUDA Version: 12.6 |"; fi\n')
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert train(tmp_path, small_dataset) == 2
    printed = console(capsys)
    assert "error: This machine has an NVIDIA GPU (NVIDIA GeForce RTX 4090)" in printed
    # CI's CPU-only torch, or the README's plain `pip install torch` (a CUDA build newer than this 12.6 driver):
    # either way, the command that installs the build the driver runs.
    assert "--index-url https://download.pytorch.org/whl/cu126" in printed and "set allow_cpu" in printed
    if torch.version.cuda is not None:
        assert f"the NVIDIA driver supports CUDA up to 12.6, older than torch's CUDA {torch.version.cuda}" in printed
    assert not (tmp_path / "logs").exists()
    assert train(tmp_path, small_dataset, "--allow_cpu") == 0
    printed = console(capsys)
    assert "Training on the CPU, as allow_cpu asks." in printed
    assert "Device: cpu, precision: no (mixed_precision auto)" in printed
