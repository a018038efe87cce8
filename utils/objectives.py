"""What the UNet learns: noise, timesteps, targets and the loss (REFERENCE.md §8.5, ADVANCED_TWEAKING.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, zero_frequency_noise_ratio: float, generator=None) -> torch.Tensor:
    """Gaussian noise plus offset noise: one extra N(0,1) value per (sample, channel) times the ratio."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if zero_frequency_noise_ratio > 0:
        offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=latents.device,
                             dtype=latents.dtype)
        noise = noise + zero_frequency_noise_ratio * offset
    return noise


def sample_timesteps(batch: int, start: int, end: int, device, generator=None) -> torch.Tensor:
    """Integer timesteps drawn uniformly from [start, end)."""
    return torch.randint(start, end, (batch,), device=device, generator=generator)


def training_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type '{prediction_type}' is not supported; use an epsilon or v_prediction model.")


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, loss_type: str,
                   loss_scale: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Per-sample weighted loss, averaged over the batch.

    mse_huber goes from pure MSE at timestep 0 to pure Huber (delta 1) at the last timestep, linearly in t;
    huber_mse is the reverse. Each sample's loss is multiplied by its loss_scale.
    """
    pred, target = pred.float(), target.float()
    if loss_type == "mse":
        per_element = F.mse_loss(pred, target, reduction="none")
    elif loss_type == "huber":
        per_element = F.huber_loss(pred, target, reduction="none", delta=1.0)
    else:
        huber_weight = (timesteps.float() / num_train_timesteps).view(-1, 1, 1, 1)
        if loss_type == "huber_mse":
            huber_weight = 1 - huber_weight
        per_element = (1 - huber_weight) * F.mse_loss(pred, target, reduction="none") + \
            huber_weight * F.huber_loss(pred, target, reduction="none", delta=1.0)
    per_sample = per_element.mean(dim=(1, 2, 3))
    return (per_sample * loss_scale.to(per_sample.device)).mean()


def runt_weight(runt_size: int, batch_size: int) -> float:
    """A batch padded with duplicates counts less: (real images / batch size) ** 1.5."""
    return (runt_size / batch_size) ** 1.5 if runt_size else 1.0
