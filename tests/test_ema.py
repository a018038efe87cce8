"""EMA (issue #5): the update against its formula, its cadence in real runs on the tiny model, the `_ema`
checkpoints beside every save (loaded back by diffusers), resuming the EMA, and which models are sampled."""
from __future__ import annotations

import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import TINY_MODEL
from tests.test_checkpoint import make_ckpt
from utils.run.checkpoint import find_last
from utils.watch.ema import EMA, sampled_models

# -- the update, on small modules -------------------------------------------------------------------------------


def small_modules() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"unet": torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4)),
            "text_encoder": torch.nn.Linear(3, 2)}


def params(modules) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules.values() for p in m.parameters()]


def set_params(modules, generator) -> list[torch.Tensor]:
    """Gives every parameter new random values, as an optimizer step would change them; returns them."""
    with torch.no_grad():
        for module in modules.values():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
    return params(modules)


@pytest.mark.parametrize("chunk_elements", [2**28, 7])  # one copy chunk, or many (some a single parameter)
def test_update_every_interval_follows_the_formula(monkeypatch, chunk_elements):
    monkeypatch.setattr("utils.watch.ema.COPY_CHUNK_ELEMENTS", chunk_elements)
    modules = small_modules()
    initial = params(modules)
    decay, every = 0.9, 3
    ema = EMA(modules, decay, every, torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    updated_at, live_at_updates = [], []
    for optimizer_update in range(1, 11):
        live = set_params(modules, generator)
        if ema.step():
            updated_at.append(optimizer_update)
            live_at_updates.append(live)
    assert updated_at == [3, 6, 9]
    # Closed form, in float64: d^3 * initial + (1 - d) * (d^2 * live_3 + d * live_6 + live_9).
    with ema.swapped_in():
        averaged = params(modules)
    for i, value in enumerate(averaged):
        expected = decay ** 3 * initial[i].double() + (1 - decay) * sum(
            decay ** (2 - k) * live[i].double() for k, live in enumerate(live_at_updates))
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(value, live_at_updates[-1][i], atol=1e-3)  # far from the live weights


def test_swapping_in_shows_the_average_and_restores_the_live_weights_bit_for_bit():
    modules = small_modules()
    initial = params(modules)
    ema = EMA(modules, 0.5, 1, torch.device("cpu"))
    live = set_params(modules, torch.Generator().manual_seed(2))
    assert ema.step()
    norm = modules["unet"][1]
    norm.running_mean.fill_(7.0)  # a buffer: never averaged, always the live one
    live_storage = [p.data_ptr() for m in modules.values() for p in m.parameters()]
    with ema.swapped_in():
        for value, before, after in zip(params(modules), initial, live):
            torch.testing.assert_close(value, 0.5 * before + 0.5 * after)
        assert torch.equal(norm.running_mean, torch.full((4,), 7.0))
    for value, expected in zip(params(modules), live):
        assert torch.equal(value, expected)
    assert [p.data_ptr() for m in modules.values() for p in m.parameters()] == live_storage


@pytest.mark.parametrize("nonema, ema, expected", [
    (False, False, ["ema"]), (True, False, [""]), (False, True, ["ema"]), (True, True, ["", "ema"])])
def test_which_models_are_sampled(nonema, ema, expected):
    args = SimpleNamespace(ema_decay_rate=0.99, ema_strength_target=None, ema_sample_nonema_model=nonema,
                           ema_sample_ema_model=ema)
    assert sampled_models(args) == expected
    assert sampled_models(SimpleNamespace(**{**vars(args), "ema_decay_rate": None})) == [""]  # EMA off


def test_findlast_for_the_ema_picks_only_ema_folders(tmp_path):
    live = make_ckpt(tmp_path / "run" / "ckpts" / "last-p-ep02-gs00020", 10)
    older_ema = make_ckpt(tmp_path / "run" / "ckpts" / "p-ep01-gs00010_ema", 100)
    newer_ema = make_ckpt(tmp_path / "run" / "ckpts" / "last-p-ep02-gs00020_ema", 20)
    make_ckpt(tmp_path / "run" / "ckpts" / "p-ep03-gs00030_ema.partial", 1)
    assert find_last(tmp_path, ema=True) == newer_ema
    assert find_last(tmp_path) == live
    shutil.rmtree(newer_ema)
    shutil.rmtree(older_ema)
    with pytest.raises(FileNotFoundError, match="ema_resume_model 'findlast': no EMA checkpoint"):
        find_last(tmp_path, ema=True)


# -- bad options stop the run before any model loads ------------------------------------------------------------


def run_main(tmp_path, data_root, *flags) -> int:
    import train

    return train.main(["--resume_ckpt", str(TINY_MODEL), "--data_root", str(data_root), "--resolution", "128",
                       "--logdir", str(tmp_path / "logs"), *flags])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_ema_on_cuda_without_a_gpu_is_refused(tmp_path, small_dataset, capsys):
    assert run_main(tmp_path, small_dataset, "--ema_decay_rate", "0.99", "--ema_device", "cuda") == 2
    assert "command line: ema_device is 'cuda' but PyTorch sees no CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("flags, message", [
    (["--ema_resume_model", "x"], "ema_resume_model is set but EMA is off"),
    (["--ema_decay_rate", "0.9", "--ema_resume_model", "missing_ema"], "ema_resume_model 'missing_ema' does not exist"),
    (["--ema_decay_rate", "0.9", "--ema_resume_model", "findlast"], "no EMA checkpoint folder"),
])
def test_bad_ema_resume_options_are_refused(tmp_path, small_dataset, capsys, flags, message):
    assert run_main(tmp_path, small_dataset, *flags) == 2
    assert message in capsys.readouterr().out
    assert not (tmp_path / "logs").exists()


def test_ema_of_another_architecture_is_refused_before_training(tmp_path, small_dataset, capsys):
    from transformers import CLIPTextConfig, CLIPTextModel

    other = tmp_path / "other-sd"
    shutil.copytree(TINY_MODEL, other)
    config = CLIPTextConfig.from_pretrained(TINY_MODEL / "text_encoder")
    config.num_hidden_layers = 1
    CLIPTextModel(config).save_pretrained(other / "text_encoder")
    assert run_main(tmp_path, small_dataset, "--ema_decay_rate", "0.9", "--ema_resume_model", str(other)) == 2
    assert re.search(rf"ema_resume_model {re.escape(str(other))}: its text_encoder does not fit the model being "
                     r"trained \(missing '[\w.]*encoder\.layers\.1\.", capsys.readouterr().out)
    assert not (tmp_path / "logs").exists()
