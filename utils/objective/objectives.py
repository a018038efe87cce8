"""What the UNet learns: noise, timesteps, targets and the loss (REFERENCE.md §8.5, ADVANCED_TWEAKING.md)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from utils.objective import flow


def sample_noise(latents: torch.Tensor, zero_frequency_noise_ratio: float, pyramid_noise_discount: float | None = None,
                 generator=None) -> torch.Tensor:
    """Gaussian noise, made pyramid noise when a discount is set, plus offset noise: one extra N(0,1) value per
    (sample, channel) times the ratio (Guttenberg's offset noise), in that order as EveryDream2 does."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if pyramid_noise_discount:
        noise = add_pyramid_noise(noise, pyramid_noise_discount, generator)
    if zero_frequency_noise_ratio > 0:
        offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=latents.device,
                             dtype=latents.dtype)
        noise = noise + zero_frequency_noise_ratio * offset
    return noise


def add_pyramid_noise(noise: torch.Tensor, discount: float, generator=None) -> torch.Tensor:
    """Multi-resolution noise (Whitaker's report): for i = 1, 2, ... adds discount**i times Gaussian noise drawn at
    (H // 2**i, W // 2**i) and upsampled bilinearly to (H, W), until a side reaches 1; then divides by the whole
    batch's std so the noise scale the schedule expects is kept.

    The report and EveryDream2 shrink by a random factor in [2, 4) per level; a fixed 2 keeps runs repeatable
    from the seed alone, with a similar low-frequency emphasis.
    """
    b, c, h, w = noise.shape
    i, level_h, level_w = 0, h, w
    while level_h > 1 and level_w > 1:
        i += 1
        level_h, level_w = max(1, h >> i), max(1, w >> i)
        level = torch.randn((b, c, level_h, level_w), generator=generator, device=noise.device, dtype=noise.dtype)
        noise = noise + discount ** i * F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False)
    return noise / noise.std()


def perturb_embedding(hidden_states: torch.Tensor, gamma: float, generator=None) -> torch.Tensor:
    """Conditional embedding perturbation (arXiv 2405.20494): adds N(0, (gamma / sqrt(d))^2) to every value of
    the text encoder's output, d its width (768 for SD1.x, 1024 for SD2.x)."""
    if gamma <= 0:
        return hidden_states
    noise = torch.randn(hidden_states.shape, generator=generator, device=hidden_states.device,
                        dtype=hidden_states.dtype)
    return hidden_states + gamma / math.sqrt(hidden_states.shape[-1]) * noise


def sample_timesteps(batch: int, start: int, end: int, device, generator=None) -> torch.Tensor:
    """Integer timesteps drawn uniformly from [start, end)."""
    return torch.randint(start, end, (batch,), device=device, generator=generator)


def noised_and_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                      rectified_flow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The one objective: (the UNet's input, what it should predict) for clean `latents` at `timesteps`. Training,
    validation and reflow all call this. Diffusion: the scheduler's noised latents and the epsilon or v target;
    rectified flow: the straight-path point and its velocity (utils.objective.flow)."""
    if rectified_flow:
        return flow.training_pair(latents, noise, timesteps, noise_scheduler.config.num_train_timesteps)
    return noise_scheduler.add_noise(latents, noise, timesteps), training_target(noise_scheduler, latents, noise,
                                                                                  timesteps)


def training_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type '{prediction_type}' is not supported; use an epsilon or v_prediction model.")


def min_snr_weight(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weight per sample (arXiv 2303.09556), SNR(t) = alpha_bar_t / (1 - alpha_bar_t):
    min(SNR, gamma) / SNR for epsilon models, min(SNR, gamma) / (SNR + 1) for v-prediction (the paper's v form).
    Prediction types other than these two are refused by training_target."""
    alpha_bar = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1 - alpha_bar)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return snr.clamp(max=gamma) / (snr + 1)
    # min(SNR, gamma) / SNR written as min(1, gamma / SNR): equal for SNR > 0, and its limit 1 instead of 0/0 at
    # the last timestep of a zero-terminal-SNR schedule.
    return (gamma / snr).clamp(max=1.0)


def mask_weights(loss_mask: torch.Tensor | None, latents: torch.Tensor, unmasked_weight: float) -> torch.Tensor | None:
    """The loss weight of every latent pixel, [N, 1, h, w] on the latents' device, from a batch's `loss_mask` (its
    images' masks at pixel resolution, uint8, 255 = learn; data/loader.py): each mask area-averaged down to the
    latents' size, then unmasked_weight + (1 - unmasked_weight) x mask, written as 1 - (1 - unmasked_weight) x
    (1 - mask) so that white (and every pixel with unmasked_weight 1) weighs exactly 1. None without masks."""
    if loss_mask is None:
        return None
    mask = loss_mask.to(latents.device, non_blocking=True).float() / 255
    mask = F.interpolate(mask, size=latents.shape[-2:], mode="area")
    return 1 - (1 - unmasked_weight) * (1 - mask)


def per_sample_mean(per_element: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's mean of `per_element` ([N, C, h, w]) over channels and pixels; with `weights` ([N, 1, h, w],
    the same for every channel) its weighted mean sum(w x l) / sum(w). That is computed as mean(w x l) / mean(w)
    with mean(w) = sum(w) / pixels, so that weights of exactly 1 give the plain mean bit for bit (the sum of ones
    is exact, and so is dividing it by its count). A sample whose weights are all 0 has nothing to learn: 0."""
    if weights is None:
        return per_element.mean(dim=(1, 2, 3))
    mean_weight = weights.sum(dim=(1, 2, 3)) / weights[0].numel()
    # Clamped, not masked with `where`: a 0 weight sum comes with a 0 numerator, and 0 / tiny keeps its gradient 0.
    return (per_element * weights).mean(dim=(1, 2, 3)) / mean_weight.clamp(min=torch.finfo(mean_weight.dtype).tiny)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, loss_type: str,
                   loss_scale: torch.Tensor, num_train_timesteps: int = 1000,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weighted loss, averaged over the batch.

    mse_huber goes from pure MSE at timestep 0 to pure Huber (delta 1) at the last timestep, linearly in t;
    huber_mse is the reverse. Each sample's loss is its mean over channels and pixels, weighted per latent pixel by
    `weights` (masks, see mask_weights) when given, and multiplied by its loss_scale (which carries any min-SNR
    weight).
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
    per_sample = per_sample_mean(per_element, weights)
    return (per_sample * loss_scale.to(per_sample.device)).mean()


def runt_weight(runt_size: int, batch_size: int) -> float:
    """A batch padded with duplicates counts less: (real images / batch size) ** 1.5."""
    return (runt_size / batch_size) ** 1.5 if runt_size else 1.0
