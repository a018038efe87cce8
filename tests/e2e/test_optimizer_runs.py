"""Optimizers in real runs of train.py: text encoder freezing and its learning-rate scale as trained and logged, a
freezing count beyond the model refused at start, a short run with each optimizer (doc/OPTIMIZERS.md)."""
from __future__ import annotations

import math

import pytest
import torch

from optimizer.optimizers import LEARNING_RATE_FREE
from tests.conftest import TINY_MODEL, read_scalars, short_run, write_json


@pytest.fixture
def two_images(tmp_path):
    """One batch of two: a training run of N epochs is N steps."""
    from PIL import Image

    root = tmp_path / "two"
    root.mkdir()
    for i, colour in enumerate(((220, 30, 30), (30, 30, 220))):
        Image.new("RGB", (64, 64), colour).save(root / f"img_{i}.png")
        (root / f"img_{i}.txt").write_text(f"a square {i}")
    return root


def tensors(folder):
    from safetensors.torch import load_file

    (file,) = folder.glob("*.safetensors")
    return load_file(file)


def test_frozen_text_encoder_parts_stay_unchanged_and_the_scale_shows_in_the_logged_rate(tmp_path, two_images):
    config = write_json(tmp_path / "opt.json", {
        "base": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0}, "text_encoder_lr_scale": 0.5,
        "text_encoder_freezing": {"unfreeze_last_n_layers": 1}})
    run = short_run(tmp_path, two_images, "--optimizer_config", str(config), "--max_epochs", "2", "--save_optimizer")
    (last,) = (run / "ckpts").glob("last-*")
    before, after = tensors(TINY_MODEL / "text_encoder"), tensors(last / "text_encoder")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    trainable = {name for name in before if "layers.1." in name or "final_layer_norm" in name}
    assert changed <= trainable
    # A key bias shifts every attention score of a query equally, so softmax gives it no gradient.
    assert changed >= {name for name in trainable if not name.endswith("k_proj.bias")}
    te_state = torch.load(last / "optimizer_te.pt", weights_only=True)
    assert len(te_state["param_groups"][0]["params"]) == len(trainable)  # frozen weights not given to the optimizer
    te_lrs = [v for _, v in read_scalars(run)["hyperparameter/lr text encoder"]]
    assert te_lrs == [pytest.approx(5e-4)] * 2
    assert "Text encoder: training " in (run / f"{run.name}.log").read_text()


def test_a_freezing_layer_count_beyond_the_model_stops_before_training(tmp_path, two_images, capsys):
    import train

    config = write_json(tmp_path / "opt.json", {"base": {"optimizer": "adamw"},
                                                "text_encoder_freezing": {"unfreeze_last_n_layers": 5}})
    status = train.main(["--resume_ckpt", str(TINY_MODEL), "--data_root", str(two_images), "--resolution", "128",
                         "--optimizer_config", str(config), "--logdir", str(tmp_path / "logs")])
    assert status == 2
    assert "unfreeze_last_n_layers 5 does not fit this text encoder's 2 layers" in capsys.readouterr().out
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("name", ["lion", "lion8bit", *LEARNING_RATE_FREE])
def test_training_runs_with_each_optimizer(tmp_path, two_images, name):
    config = write_json(tmp_path / "opt.json", {"base": {"optimizer": name}})
    run = short_run(tmp_path, two_images, "--optimizer_config", str(config), "--max_epochs", "2")
    (last,) = (run / "ckpts").glob("last-*")
    before, after = tensors(TINY_MODEL / "unet"), tensors(last / "unet")
    assert all(torch.isfinite(value).all() for value in after.values())
    assert any(not torch.equal(before[key], after[key]) for key in before)
    unet_lrs = [v for _, v in read_scalars(run)["hyperparameter/lr unet"]]
    assert len(unet_lrs) == 2 and all(0 < lr < math.inf for lr in unet_lrs)
