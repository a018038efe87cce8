"""Loss, noise, timesteps and targets checked against their formulas, computed independently here."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from utils.objective.objectives import diffusion_loss, min_snr_weight, perturb_embedding, runt_weight, sample_noise, \
    sample_timesteps, training_target


def sd_scheduler(prediction_type="epsilon", **kwargs):
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type=prediction_type, **kwargs)


def sd_alpha_bar() -> torch.Tensor:
    """SD's scaled-linear schedule, in float64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


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


def test_pyramid_noise_is_the_discounted_sum_of_upsampled_levels():
    latents = torch.zeros(3, 4, 16, 12)
    noise = sample_noise(latents, 0.0, 0.6, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    expected = torch.randn(3, 4, 16, 12, generator=gen)
    for i, size in enumerate([(8, 6), (4, 3), (2, 1)], start=1):  # halved until a side is 1
        level = torch.randn(3, 4, *size, generator=gen)
        expected = expected + 0.6 ** i * F.interpolate(level, size=(16, 12), mode="bilinear", align_corners=False)
    assert torch.allclose(noise, expected / expected.std(), atol=1e-6)
    # then offset noise on top, from the next draws
    with_offset = sample_noise(latents, 0.1, 0.6, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(with_offset, noise + 0.1 * torch.randn(3, 4, 1, 1, generator=gen), atol=1e-6)


def test_pyramid_noise_has_unit_std_and_low_frequency_power():
    latents = torch.zeros(256, 4, 16, 16)
    noise = sample_noise(latents, 0.0, 0.8, generator=torch.Generator().manual_seed(0))
    assert abs(noise.std().item() - 1) < 1e-4
    # White noise's per-(sample, channel) mean has variance 1/256. The 1x1 level alone adds 0.8**8 = 0.168 to it,
    # out of a total variance below 1 + 0.64 + 0.41 + 0.26 + 0.17 = 2.48 before normalising: at least 0.068.
    channel_means = noise.mean(dim=(2, 3))
    assert channel_means.var().item() > 0.068
    plain = sample_noise(latents, 0.0, 0.0, generator=torch.Generator().manual_seed(0))
    assert plain.mean(dim=(2, 3)).var().item() < 0.006


def test_embedding_perturbation_has_std_gamma_over_sqrt_width():
    hidden = torch.randn(4, 77, 768, generator=torch.Generator().manual_seed(0))
    got = perturb_embedding(hidden, 2.0, generator=torch.Generator().manual_seed(1))
    expected_noise = torch.randn(4, 77, 768, generator=torch.Generator().manual_seed(1)) * 2.0 / math.sqrt(768)
    assert torch.allclose(got, hidden + expected_noise, atol=1e-6)
    delta = got - hidden
    assert abs(delta.mean().item()) < 1e-3
    assert abs(delta.std().item() / (2.0 / math.sqrt(768)) - 1) < 0.01  # 236k values: std known to ~0.2%
    assert perturb_embedding(hidden, 0.0) is hidden


def test_min_snr_weights_for_epsilon_and_v_prediction():
    t = torch.tensor([0, 50, 200, 500, 800, 999])
    alpha_bar = sd_alpha_bar()[t]
    snr = alpha_bar / (1 - alpha_bar)
    gamma = 5.0
    eps = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr
    v = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / (snr + 1)
    assert torch.allclose(min_snr_weight(sd_scheduler("epsilon"), t, gamma).double(), eps, rtol=1e-4)
    assert torch.allclose(min_snr_weight(sd_scheduler("v_prediction"), t, gamma).double(), v, rtol=1e-4)
    assert eps[0] < 0.01 and eps[-1] == 1  # the formula itself: low t (SNR ~1000) weighs ~gamma/SNR, high t 1


def test_min_snr_weights_at_zero_terminal_snr_are_the_formulas_limits():
    t = torch.tensor([998, 999])
    eps = min_snr_weight(sd_scheduler("epsilon", rescale_betas_zero_snr=True), t, 5.0)
    v = min_snr_weight(sd_scheduler("v_prediction", rescale_betas_zero_snr=True), t, 5.0)
    assert torch.equal(eps, torch.ones(2))  # min(SNR, 5)/SNR = 1 for SNR < 5, and its limit at SNR = 0
    assert v[1] == 0 and 0 < v[0] < 1e-3  # min(SNR, 5)/(SNR + 1) = SNR/(SNR + 1) -> 0
