"""optimizer.json resolution, LR schedules against their formulas, and real optimizer construction."""
from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from optimizer.freezing import freeze_text_encoder
from optimizer.optimizers import (TrainingOptimizers, check_optimizers_run_here, make_lr_schedule,
                                  read_optimizer_file, resolve_settings)
from tests.conftest import TINY_MODEL, write_json
from utils.options.config import ConfigError


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
    ({"base": {"optimizer": "coordinate_dowg"}}, "optimizer 'coordinate_dowg' is not supported by this trainer"),
    ({"text_encoder_overrides": {"optimizer": "scalar_dowg"}}, "Use one of: adamw, adamw8bit, lion, lion8bit, prodigy"),
    ({"bsae": {}}, "unknown key 'bsae'. Did you mean 'base'?"),
    ({"base": {"betas": [0.9]}}, "base.betas must be two numbers in [0, 1)"),
    ({"base": {"optimizer": "dadapt_adan", "betas": [0.9, 0.999]}},
     "base: optimizer 'dadapt_adan' takes 3 betas, e.g. [0.98, 0.92, 0.99]; got [0.9, 0.999]. Set base.betas."),
    ({"base": {"optimizer": "dadapt_adan", "betas": [0.98, 0.92, 0.99]}, "text_encoder_overrides": {"optimizer": "lion"}},
     "text_encoder_overrides: optimizer 'lion' takes 2 betas, e.g. [0.9, 0.999]; got [0.98, 0.92, 0.99] (from base)"),
    ({"base": {"growth_rate": 0.5}}, "base.growth_rate must be a number >= 1"),
    ({"text_encoder_overrides": {"safeguard_warmup": "yes"}}, "text_encoder_overrides.safeguard_warmup must be true"),
    ({"base": {"lr_scheduler": "cosin"}}, "base.lr_scheduler must be one of constant"),
    ({"text_encoder_lr_scale": -1}, "text_encoder_lr_scale must be a number > 0"),
    ({"text_encoder_freezing": {"unfreeze_last_layers": 2}}, "unknown key 'text_encoder_freezing.unfreeze_last_"),
    ({"text_encoder_freezing": {"unfreeze_last_n_layers": 0}}, "unfreeze_last_n_layers must be at least 1"),
    ({"text_encoder_freezing": {"freeze_embeddings": 1}}, "freeze_embeddings must be true, false or null"),
    ({"text_encoder_freezing": {"unfreeze_last_n_layers": 1.5}}, "must be a whole number or null"),
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


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "lion", "lion8bit"])
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
        norms, stepped = opts.clip_and_step(None, clip_grad_norm=1.0)
        assert stepped
        opts.step_schedules()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8
    assert set(norms) == {"unet", "text_encoder"}
    assert set(opts.current_lrs()) == {"unet", "text_encoder"}


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_an_update_with_non_finite_gradients_is_skipped_whole(bad):
    """One non-finite gradient anywhere (here only in the text encoder) drops the whole update: no weight and no
    optimizer state moves, the gradients are cleared, and the next finite update steps as usual."""
    torch.manual_seed(0)
    unet_like, te_like = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    settings = resolve_settings({"base": {"optimizer": "adamw", "lr": 1e-2}}, main_args(), steps_per_epoch=10)
    opts = TrainingOptimizers({"unet": unet_like, "text_encoder": te_like}, settings)
    before = [p.detach().clone() for p in (*unet_like.parameters(), *te_like.parameters())]
    (unet_like(torch.ones(1, 4)).sum() + te_like(torch.ones(1, 4)).sum() * bad).backward()
    norms, stepped = opts.clip_and_step(None, clip_grad_norm=None)
    assert not stepped and not math.isfinite(norms["text_encoder"]) and math.isfinite(norms["unet"])
    after = [p.detach() for p in (*unet_like.parameters(), *te_like.parameters())]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for p in (*unet_like.parameters(), *te_like.parameters()))
    assert all(not optimizer.state for optimizer in opts.optimizers.values())
    (unet_like(torch.ones(1, 4)).sum() + te_like(torch.ones(1, 4)).sum()).backward()
    assert opts.clip_and_step(None, clip_grad_norm=None)[1]
    assert not torch.equal(unet_like.weight, before[0])


def test_scale_lr_multiplies_both_rates_by_the_effective_batch_to_the_055():
    data = {"base": {"optimizer": "adamw", "lr": 2e-6}, "text_encoder_overrides": {"lr": 1e-6}}
    settings = resolve_settings(data, main_args(scale_lr=True, batch_size=6, grad_accum=2), steps_per_epoch=5)
    assert settings["unet"].lr == pytest.approx(2e-6 * 12 ** 0.55)
    assert settings["text_encoder"].lr == pytest.approx(1e-6 * 12 ** 0.55)


def test_text_encoder_lr_scale_multiplies_the_text_encoders_rate(tmp_path, caplog):
    scaled = {"base": {"optimizer": "adamw", "lr": 2e-6}, "text_encoder_lr_scale": 0.25}
    settings = resolve_settings(scaled, main_args(), steps_per_epoch=5)
    assert settings["unet"].lr == 2e-6 and settings["text_encoder"].lr == pytest.approx(5e-7)
    with caplog.at_level(logging.WARNING):  # main lr replaces the file's rates; the scale still applies
        settings = resolve_settings(scaled, main_args(lr=4e-6), steps_per_epoch=5)
    assert settings["unet"].lr == 4e-6 and settings["text_encoder"].lr == pytest.approx(1e-6)
    explicit = dict(scaled, text_encoder_overrides={"lr": 3e-7})
    with caplog.at_level(logging.WARNING):
        settings = resolve_settings(explicit, main_args(), steps_per_epoch=5)
    assert settings["text_encoder"].lr == 3e-7
    assert "text_encoder_lr_scale 0.25 is ignored" in caplog.text


def test_learning_rate_free_optimizers_default_to_lr_1_and_warn_about_adam_rates(caplog):
    data = {"base": {"optimizer": "prodigy"}, "text_encoder_overrides": {"optimizer": "adamw"}}
    settings = resolve_settings(data, main_args(), steps_per_epoch=5)
    assert settings["unet"].lr == 1.0 and settings["text_encoder"].lr == 1e-6
    assert settings["unet"].extra["d0"] == 1e-6 and settings["unet"].extra["safeguard_warmup"] is True
    with caplog.at_level(logging.WARNING):
        resolve_settings({"base": {"optimizer": "adacoor", "lr": 2e-6}}, main_args(), steps_per_epoch=5)
    assert "adacoor adapts its own step size and lr 2e-06 multiplies it" in caplog.text


def test_dadapt_adan_defaults_to_its_packages_three_betas():
    settings = resolve_settings({"base": {"optimizer": "dadapt_adan"}, "text_encoder_overrides": {"optimizer": "adamw"}},
                                main_args(), steps_per_epoch=5)
    assert settings["unet"].betas == (0.98, 0.92, 0.99) and settings["text_encoder"].betas == (0.9, 0.999)


@pytest.mark.parametrize("name", ["lion", "prodigy", "dadapt_sgd"])
def test_lr_0_for_an_optimizer_whose_package_refuses_it_is_a_clear_error(name):
    with pytest.raises(ConfigError, match=f"lr 0 for the text encoder's {name}: .* set disable_textenc_training"):
        resolve_settings({"base": {"optimizer": name}, "text_encoder_overrides": {"lr": 0}}, main_args(),
                         steps_per_epoch=5)


def test_the_logged_rate_of_a_d_adapting_optimizer_is_d_times_lr():
    opts = TrainingOptimizers({"unet": torch.nn.Linear(2, 2)},
                              resolve_settings({"base": {"optimizer": "prodigy", "lr": 0.5}}, main_args(), 5))
    opts.optimizers["unet"].param_groups[0]["d"] = 0.25
    assert opts.current_lrs() == {"unet": 0.125}


def stepped_optimizers(model: torch.nn.Module, name: str) -> TrainingOptimizers:
    opts = TrainingOptimizers({"unet": model}, resolve_settings({"base": {"optimizer": name}}, main_args(), 5))
    model(torch.ones(1, 2)).sum().backward()
    opts.clip_and_step(None, clip_grad_norm=None)
    return opts


def test_a_saved_state_loads_into_its_own_optimizer_and_not_into_a_package_optimizer_of_another_kind():
    """Torch would load the other's state (same parameters), and the package's first step would fail for want of its
    settings."""
    model = torch.nn.Linear(2, 2)
    prodigy = stepped_optimizers(model, "prodigy")
    resumed = TrainingOptimizers({"unet": model}, resolve_settings({"base": {"optimizer": "prodigy"}}, main_args(), 5))
    resumed.load_state_dicts(prodigy.state_dicts())
    assert resumed.optimizers["unet"].param_groups[0]["k"] == 1
    with pytest.raises(ValueError, match="saved by another optimizer: no .*d0"):
        resumed.load_state_dicts(stepped_optimizers(model, "adamw").state_dicts())


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit"])
def test_bitsandbytes_optimizers_pass_the_probe_on_cpu(name):
    check_optimizers_run_here({"base": {"optimizer": name}}, "optimizer.json", "cpu")


def test_lion_needs_no_bitsandbytes_probe():
    check_optimizers_run_here({"base": {"optimizer": "lion"}}, "optimizer.json", "meta")  # where a probe would fail


def test_a_device_bitsandbytes_cannot_train_on_is_a_clear_error_naming_the_key():
    """The meta device holds no values, so the probe's step cannot be checked there: a real failure."""
    with pytest.raises(ConfigError) as err:
        check_optimizers_run_here({"text_encoder_overrides": {"optimizer": "lion8bit"}, "base": {"optimizer": "adamw"}},
                                  "my_optimizer.json", "meta")
    message = str(err.value)
    assert message.startswith("my_optimizer.json: text_encoder_overrides.optimizer 'lion8bit' needs bitsandbytes")
    assert "'adamw'" in message
    with pytest.raises(ConfigError, match=r"base.optimizer \(unset: the default\) 'adamw8bit'"):
        check_optimizers_run_here({}, "optimizer.json", "meta")


def tiny_text_encoder():
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(TINY_MODEL / "text_encoder")


def trainable_parts(text_encoder) -> set[str]:
    """Which of embeddings / layer.N / final_layer_norm have trainable weights."""
    parts = set()
    for name, param in text_encoder.named_parameters():
        if param.requires_grad:
            name = name.removeprefix("text_model.")
            parts.add("layer." + name.split(".")[2] if name.startswith("encoder.layers") else name.split(".")[0])
    return parts


@pytest.mark.parametrize("freezing, parts", [
    (None, {"embeddings", "layer.0", "layer.1", "final_layer_norm"}),
    ({"unfreeze_last_n_layers": 1}, {"layer.1", "final_layer_norm"}),
    ({"unfreeze_last_n_layers": 2}, {"embeddings", "layer.0", "layer.1", "final_layer_norm"}),
    ({"unfreeze_last_n_layers": 1, "freeze_embeddings": False, "freeze_final_layer_norm": True},
     {"embeddings", "layer.1"}),
    ({"freeze_front_n_layers": 1}, {"layer.1", "final_layer_norm"}),
    ({"freeze_front_n_layers": -1}, {"layer.1", "final_layer_norm"}),
    ({"freeze_front_n_layers": 0, "unfreeze_last_n_layers": 1}, {"layer.1", "final_layer_norm"}),
])
def test_text_encoder_freezing_leaves_the_configured_parts_trainable(freezing, parts):
    text_encoder = tiny_text_encoder()
    summary = freeze_text_encoder({"text_encoder": text_encoder}, freezing, "opt.json")
    assert trainable_parts(text_encoder) == parts
    trainable = sum(p.numel() for p in text_encoder.parameters() if p.requires_grad)
    assert summary.startswith(f"training {trainable:,} of ")


def test_freezing_more_layers_than_the_model_has_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"opt.json: text_encoder_freezing.unfreeze_last_n_layers 3 does not fit "
                                          r"this text encoder's 2 layers"):
        freeze_text_encoder({"text_encoder": tiny_text_encoder()}, {"unfreeze_last_n_layers": 3}, "opt.json")
    with pytest.raises(ConfigError, match="freeze_front_n_layers 2 does not fit"):
        freeze_text_encoder({"text_encoder": tiny_text_encoder()}, {"freeze_front_n_layers": 2}, "opt.json")
    assert freeze_text_encoder({}, {"unfreeze_last_n_layers": 3}, "opt.json") is None  # text encoder not trained


def test_trained_layers_get_gradients_with_reentrant_checkpointing_and_frozen_embeddings():
    """transformers 4's default: re-entrant checkpointing without the input hook transformers 5 adds."""
    text_encoder = tiny_text_encoder()
    text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    text_encoder.disable_input_require_grads()
    text_encoder.train()
    freeze_text_encoder({"text_encoder": text_encoder}, {"unfreeze_last_n_layers": 1}, "opt.json")
    text_encoder(torch.randint(0, 1000, (2, 77))).last_hidden_state.square().sum().backward()
    trained = [p for p in text_encoder.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained if p.ndim == 2)
