"""The one training step (forward and loss), shared by the training loop and the benchmark."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.objectives import diffusion_loss, runt_weight, sample_noise, sample_timesteps, training_target


@dataclass
class StepSettings:
    """The options a step reads; rebuilt from args each epoch so live changes apply."""
    loss_type: str
    zero_frequency_noise_ratio: float
    timestep_start: int
    timestep_end: int
    batch_size: int

    @classmethod
    def from_args(cls, args) -> StepSettings:
        return cls(args.loss_type, args.zero_frequency_noise_ratio, args.timestep_start, args.timestep_end,
                   args.batch_size)


@torch.no_grad()
def encode_images(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents (a posterior sample, as the model was trained)."""
    pixel_values = pixel_values.to(device=vae.device, dtype=vae.dtype, non_blocking=True)
    return vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor


def encode_text(text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
    return text_encoder(input_ids.to(text_encoder.device, non_blocking=True))[0]


def compute_loss(unet, text_encoder, vae, noise_scheduler, batch: dict, settings: StepSettings) -> torch.Tensor:
    """Noises the batch's latents, predicts with the UNet and returns the weighted loss (a 0-dim tensor)."""
    latents = encode_images(vae, batch["pixel_values"]).float()
    encoder_hidden_states = encode_text(text_encoder, batch["input_ids"])
    noise = sample_noise(latents, settings.zero_frequency_noise_ratio)
    timesteps = sample_timesteps(latents.shape[0], settings.timestep_start, settings.timestep_end, latents.device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = training_target(noise_scheduler, latents, noise, timesteps)
    pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    loss = diffusion_loss(pred, target, timesteps, settings.loss_type, batch["loss_scale"],
                          noise_scheduler.config.num_train_timesteps)
    return loss * runt_weight(batch["runt_size"], settings.batch_size)
