"""The UNet's prediction, as training, validation and reflow all ask for it."""
from __future__ import annotations

import torch


def predict(unet, noisy_latents: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction in fp32. With bf16_weights the inputs are cast to the weights' dtype first: what autocast
    does on a GPU, and what the CPU (without autocast) needs."""
    weights_dtype = next(unet.parameters()).dtype
    if weights_dtype != torch.float32:
        noisy_latents, hidden = noisy_latents.to(weights_dtype), hidden.to(weights_dtype)
    return unet(noisy_latents, timesteps, hidden).sample.float()
