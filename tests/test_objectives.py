"""Loss, noise, timesteps and targets checked against their formulas, computed independently here."""
from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler

from utils.objectives import diffusion_loss, runt_weight, sample_noise, sample_timesteps, training_target


def sd_scheduler(prediction_type="epsilon"):
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type=prediction_type)


def test_mse_and_huber_match_their_definitions():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8) * 2, torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    ones = torch.ones(3)
    diff = pred - target
    mse = (diff ** 2).mean()
    huber = torch.where(diff.abs() <= 1, 0.5 * diff ** 2, diff.abs() - 0.5).mean()
    assert torch.allclose(diffusion_loss(pred, target, t, "mse", ones), mse)
    assert torch.allclose(diffusion_loss(pred, target, t, "huber", ones), huber)


def test_mse_huber_goes_from_mse_at_t0_to_huber_at_t999():
    torch.manual_seed(1)
    pred, target = torch.randn(1, 4, 8, 8) * 3, torch.randn(1, 4, 8, 8)
    diff = pred - target
    mse = (diff ** 2).mean()
    huber = torch.where(diff.abs() <= 1, 0.5 * diff ** 2, diff.abs() - 0.5).mean()
    one = torch.ones(1)
    for t in (0, 250, 999):
        w = t / 1000
        expected_mse_huber = (1 - w) * mse + w * huber
        expected_huber_mse = w * mse + (1 - w) * huber
        got = diffusion_loss(pred, target, torch.tensor([t]), "mse_huber", one)
        assert torch.allclose(got, expected_mse_huber, rtol=1e-5)
        got = diffusion_loss(pred, target, torch.tensor([t]), "huber_mse", one)
        assert torch.allclose(got, expected_huber_mse, rtol=1e-5)


def test_loss_scale_weights_each_sample():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])  # per-sample MSE 1 and 4
    got = diffusion_loss(pred, target, torch.tensor([0, 0]), "mse", torch.tensor([2.0, -0.5]))
    assert math.isclose(got.item(), (2 * 1 + -0.5 * 4) / 2)


def test_runt_weight():
    assert runt_weight(0, 4) == 1.0
    assert math.isclose(runt_weight(1, 4), 0.25 ** 1.5)


def test_offset_noise_adds_one_value_per_sample_and_channel():
    latents = torch.zeros(64, 4, 16, 16)
    gen = torch.Generator().manual_seed(3)
    noise = sample_noise(latents, 0.5, generator=gen)
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(latents.shape, generator=gen)
    offset = torch.randn(64, 4, 1, 1, generator=gen)
    assert torch.allclose(noise, base + 0.5 * offset)
    # statistically: per-(sample, channel) means carry the offset's variance 0.25 on top of 1/256
    channel_means = noise.mean(dim=(2, 3))
    assert 0.18 < channel_means.var().item() < 0.34
    assert torch.equal(sample_noise(latents, 0.0, generator=torch.Generator().manual_seed(3)),
                       torch.randn(latents.shape, generator=torch.Generator().manual_seed(3)))


def test_timesteps_are_uniform_in_the_half_open_range():
    t = sample_timesteps(20000, 200, 300, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.min() == 200 and t.max() == 299
    counts = torch.bincount(t - 200, minlength=100).float()
    assert counts.std() / counts.mean() < 0.15  # ~200 per value; a skewed sampler would fail this


def test_targets_for_epsilon_and_v_prediction():
    torch.manual_seed(2)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    assert torch.equal(training_target(sd_scheduler("epsilon"), latents, noise, t), noise)
    scheduler = sd_scheduler("v_prediction")
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    v = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    assert torch.allclose(training_target(scheduler, latents, noise, t), v, atol=1e-5)
