"""optimizer.json resolution, LR schedules against their formulas, and real optimizer construction."""
from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from optimizer.optimizers import (TrainingOptimizers, make_lr_schedule, read_optimizer_file, resolve_settings)
from tests.conftest import write_json
from utils.config import ConfigError


def main_args(**overrides):
    values = dict(lr=None, lr_scheduler="constant", lr_warmup_steps=None, lr_decay_steps=None, max_epochs=10,
                  sources={}, scale_lr=False, batch_size=2, grad_accum=1)
    values.update(overrides)
    return SimpleNamespace(**values)


def test_defaults_without_a_file(tmp_path):
    settings = resolve_settings(read_optimizer_file(tmp_path / "optimizer.json"), main_args(), steps_per_epoch=20)
    unet = settings["unet"]
    assert (unet.optimizer, unet.lr, unet.betas, unet.epsilon, unet.weight_decay) == \
        ("adamw8bit", 1e-6, (0.9, 0.999), 1e-8, 0.01)
    assert unet.lr_decay_steps == int(20 * 10 * 1.5) and unet.lr_warmup_steps == int(300 / 50)
    assert settings["text_encoder"] == unet


def test_text_encoder_overrides_and_main_lr_precedence(tmp_path, caplog):
    file = write_json(tmp_path / "opt.json", {
        "doc": "anything",
        "base": {"optimizer": "adamw", "lr": 2e-6, "lr_scheduler": "cosine", "weight_decay": 0.0},
        "text_encoder_overrides": {"lr": 5e-7, "lr_scheduler": None, "betas": [0.8, 0.99]},
    })
    data = read_optimizer_file(file)
    settings = resolve_settings(data, main_args(lr_decay_steps=1000), steps_per_epoch=5)
    unet, te = settings["unet"], settings["text_encoder"]
    assert (unet.optimizer, unet.lr, unet.lr_scheduler, unet.weight_decay) == ("adamw", 2e-6, "cosine", 0.0)
    assert (te.optimizer, te.lr, te.lr_scheduler, te.betas) == ("adamw", 5e-7, "cosine", (0.8, 0.99))
    assert unet.lr_decay_steps == 1000 and unet.lr_warmup_steps == 20
    with caplog.at_level(logging.WARNING):
        settings = resolve_settings(data, main_args(lr=1e-5, sources={"lr": "train.json"}), steps_per_epoch=5)
    assert settings["unet"].lr == settings["text_encoder"].lr == 1e-5
    assert "overrides the learning rates in optimizer.json" in caplog.text


@pytest.mark.parametrize("content, message", [
    ({"base": {"optimiser": "adamw"}}, "unknown key 'base.optimiser'. Did you mean 'optimizer'?"),
    ({"base": {"optimizer": "sgd9000"}}, "unknown optimizer 'sgd9000'"),
    ({"base": {"optimizer": "prodigy"}}, "optimizer 'prodigy' is not implemented yet"),
    ({"bsae": {}}, "unknown key 'bsae'. Did you mean 'base'?"),
])
def test_bad_optimizer_files(tmp_path, content, message):
    file = write_json(tmp_path / "opt.json", content)
    with pytest.raises(ConfigError) as err:
        read_optimizer_file(file)
    assert message in str(err.value) and str(file) in str(err.value)


def test_cosine_schedule_warms_up_then_decays_and_stays_at_zero():
    settings = resolve_settings({"base": {"optimizer": "adamw", "lr": 1.0, "lr_scheduler": "cosine"}},
                                main_args(lr_decay_steps=100, lr_warmup_steps=10), steps_per_epoch=1)["unet"]
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=settings.lr)
    schedule = make_lr_schedule(opt, settings)
    lrs = []
    for _ in range(150):
        lrs.append(schedule.get_last_lr()[0])
        opt.step()
        schedule.step()
    for step in (0, 5, 9):
        assert math.isclose(lrs[step], step / 10)
    for step in (10, 40, 99):
        progress = (step - 10) / 90
        assert math.isclose(lrs[step], 0.5 * (1 + math.cos(math.pi * progress)), abs_tol=1e-9)
    assert all(lr == 0 for lr in lrs[100:])  # diffusers' cosine would rise again past the decay steps


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_optimizers_train_a_real_model(name):
    torch.manual_seed(0)
    unet_like, te_like = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    settings = resolve_settings({"base": {"optimizer": name, "lr": 1e-2}}, main_args(), steps_per_epoch=10)
    opts = TrainingOptimizers({"unet": unet_like, "text_encoder": te_like}, settings)
    x = torch.randn(32, 64)
    losses = []
    for _ in range(30):
        loss = (unet_like(x) + te_like(x) - x).pow(2).mean()
        loss.backward()
        norms = opts.clip_and_step(None, clip_grad_norm=1.0, measure_norms=True)
        opts.step_schedules()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8
    assert set(norms) == {"unet", "text_encoder"}
    assert set(opts.current_lrs()) == {"unet", "text_encoder"}


def test_scale_lr_multiplies_both_rates_by_the_effective_batch_to_the_055():
    data = {"base": {"optimizer": "adamw", "lr": 2e-6}, "text_encoder_overrides": {"lr": 1e-6}}
    settings = resolve_settings(data, main_args(scale_lr=True, batch_size=6, grad_accum=2), steps_per_epoch=5)
    assert settings["unet"].lr == pytest.approx(2e-6 * 12 ** 0.55)
    assert settings["text_encoder"].lr == pytest.approx(1e-6 * 12 ** 0.55)
