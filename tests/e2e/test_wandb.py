"""Weights & Biases logging (`wandb`), for real in offline mode (WANDB_MODE=offline): W&B's own record file is read
back and holds the scalars, sample images and config that TensorBoard has, under the project and run name."""
from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO, TINY_MODEL, read_scalars, read_wandb, tensorboard_images, wandb_scalars

pytest.importorskip("wandb", reason="wandb is an optional package; the README's test command installs it")


def train(tmp_path, data_root, *flags: str) -> int:
    import train

    return train.main(["--resume_ckpt", str(TINY_MODEL), "--data_root", str(data_root), "--resolution", "64",
                       "--batch_size", "2", "--max_epochs", "1", "--optimizer_config",
                       str(REPO / "cfgs" / "tiny_optimizer.json"), "--logdir", str(tmp_path / "logs"),
                       "--no_save_ckpt", "--wandb", *flags])


def test_the_wandb_run_has_tensorboards_scalars_samples_and_the_config(tmp_path, small_dataset, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    assert train(tmp_path, small_dataset, "--project_name", "wb", "--run_name", "first try", "--log_step", "1",
                 "--sample_prompts", str(prompts), "--sample_steps", "2") == 0
    (run,) = (tmp_path / "logs").iterdir()
    wandb = read_wandb(run)
    assert (wandb["run"].project, wandb["run"].display_name, wandb["exit_code"]) == ("wb", "first try", 0)
    assert wandb["config"]["main_cfg"]["batch_size"] == 2 and wandb["config"]["main_cfg"]["run_name"] == "first try"
    assert wandb["config"]["optimizer_cfg"] == json.loads((REPO / "cfgs" / "tiny_optimizer.json").read_text())

    scalars = read_scalars(run)  # TensorBoard is still written, and W&B has the same values at the same steps
    for tag in ("loss/log_step", "loss/epoch", "hyperparameter/lr unet", "optimizer/unet_grad_norm"):
        assert wandb_scalars(wandb, tag) == pytest.approx(dict(scalars[tag]), rel=1e-6) != {}, tag
    tag = "sample_000_a red square"
    samples = [row for row in wandb["history"] if f"{tag}/filenames" in row]
    assert [row["global_step"] for row in samples] == [step for step, _ in tensorboard_images(run)[tag]] == [0, 2, 4]
    for row in samples:
        (image,) = row[f"{tag}/filenames"]
        assert (wandb["files"] / image).stat().st_size > 0
        assert (row[f"{tag}/width"], row[f"{tag}/height"]) == (3 * 64, 64)  # three cfgs side by side


def test_without_the_package_the_run_stops_before_anything_is_made(tmp_path, small_dataset, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    assert train(tmp_path, small_dataset) == 2
    assert "command line: wandb is on but the wandb package is not installed. Install it (`pip install wandb`" in \
        capsys.readouterr().out
    assert not (tmp_path / "logs").exists()


def test_a_wandb_that_cannot_start_leaves_no_run_folder(tmp_path, small_dataset, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no saved login either
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert train(tmp_path, small_dataset) == 2
    out = capsys.readouterr().out
    assert "wandb: could not start a Weights & Biases run (UsageError: No API key configured" in out
    assert "set the environment variable WANDB_MODE=offline" in out
    assert list((tmp_path / "logs").iterdir()) == []
