"""The one training step (forward, loss, backward, optimizer), shared by the training loop and the benchmark."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from accelerate.utils import extract_model_from_parallel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor

from data.latent_cache import store
from utils.objective import flow
from utils.objective.objectives import diffusion_loss, mask_weights, min_snr_weight, noised_and_target, \
    perturb_embedding, runt_weight, sample_noise, sample_timesteps
from utils.objective.prediction import predict


@dataclass
class StepSettings:
    """The options a step reads; rebuilt from args each epoch so live changes apply."""
    loss_type: str
    zero_frequency_noise_ratio: float
    timestep_start: int
    timestep_end: int
    batch_size: int
    pyramid_noise_discount: float | None
    embedding_perturbation: float
    min_snr_gamma: float | None
    clip_skip: int
    rectified_flow: bool = False
    masked_loss_unmasked_weight: float = 0.0

    @classmethod
    def from_args(cls, args) -> StepSettings:
        return cls(args.loss_type, args.zero_frequency_noise_ratio, args.timestep_start, args.timestep_end,
                   args.batch_size, args.pyramid_noise_discount, args.embedding_perturbation, args.min_snr_gamma,
                   args.clip_skip, args.rectified_flow, args.masked_loss_unmasked_weight)


@dataclass(frozen=True)
class BatchShare:
    """Which rows of the global batch (all training processes' batches together) this process trains: process
    `rank` of `processes`, each with b rows, has rows [rank x b, (rank + 1) x b).

    A step's random draws (VAE sample, embedding perturbation, noise, timesteps) are made for the whole global
    batch on every process, from the same seeded stream, and each process keeps its own rows. So n processes of
    batch b train on exactly the draws one process of batch n x b would, and every process's random stream
    stays the same as the others'. Drawing n times the numbers costs little next to the forward pass."""
    rank: int = 0
    processes: int = 1

    def whole(self, mine: torch.Tensor) -> torch.Tensor:
        """A zero tensor shaped like the global batch of which `mine` is this process's rows."""
        return mine.new_zeros((mine.shape[0] * self.processes, *mine.shape[1:]))

    def mine(self, whole: torch.Tensor) -> torch.Tensor:
        rows = whole.shape[0] // self.processes
        return whole[self.rank * rows:(self.rank + 1) * rows]


def _no_mark(phase: str) -> None:
    pass


@torch.no_grad()
def posterior_parameters(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> the VAE posterior's mean and log-variance, [N, 2 x latent channels, h, w], contiguous."""
    pixel_values = pixel_values.to(device=vae.device, dtype=vae.dtype, non_blocking=True)
    # The VAE's convolutions may hand back channels-last tensors; latents read from the latent cache are contiguous.
    # One layout for both, or a compiled UNet compiles again for the other when the cache starts being read.
    return vae.encode(pixel_values).latent_dist.parameters.contiguous()


@torch.no_grad()
def sample_latents(vae, parameters: torch.Tensor, generator: torch.Generator | None = None,
                   share: BatchShare = BatchShare()) -> torch.Tensor:
    """Scaled latents: a sample of the posterior, as the model was trained (the same draw vae.encode's would be;
    with several processes, drawn for the global batch of `share`)."""
    posterior = DiagonalGaussianDistribution(parameters)
    mean = posterior.mean
    eps = randn_tensor(share.whole(mean).shape, generator=generator, device=parameters.device, dtype=parameters.dtype)
    return (mean + posterior.std * share.mine(eps)) * vae.config.scaling_factor


def encode_images(vae, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents."""
    return sample_latents(vae, posterior_parameters(vae, pixel_values), generator)


def batch_posterior(vae, batch: dict) -> torch.Tensor:
    """The posterior parameters of every image of a batch: from the latent cache where the loader found them,
    from the VAE for the rest (which are then stored in the cache; that copy to the host is the one sync, and
    happens only while the cache fills)."""
    misses = batch.get("latent_misses")  # present when the loader uses a latent cache
    encoded = posterior_parameters(vae, batch["pixel_values"]) if "pixel_values" in batch else None
    if misses is None:
        return encoded
    if encoded is not None:
        store(misses["entries"], encoded)
    if batch["latent_params"] is None:
        return encoded
    params = batch["latent_params"].to(vae.device, non_blocking=True)
    if encoded is not None:
        params[misses["slots"].to(vae.device)] = encoded.to(params.dtype)
    return params


def encode_text(text_encoder, input_ids: torch.Tensor, clip_skip: int = 0,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's conditioning: the text encoder's last hidden state, or with clip_skip N >= 2 the hidden state
    N layers back counting the last as 1, passed through the final layer norm as the last one is (EveryDream2's
    and AUTOMATIC1111's clip skip). Diffusers' SD2.x text encoders already stop one layer short of the original
    24, so there N goes that much further back.

    Training passes no `attention_mask`; sample prompts that weigh a word down pass one that hides it."""
    input_ids = input_ids.to(text_encoder.device, non_blocking=True)
    if attention_mask is not None:
        attention_mask = attention_mask.to(text_encoder.device, non_blocking=True)
    if clip_skip < 2:
        return text_encoder(input_ids, attention_mask=attention_mask)[0]
    output = text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden = output.hidden_states[-clip_skip]
    # transformers 5 keeps the layer norm on CLIPTextModel itself; 4.x on its inner text_model. With several
    # processes the model is wrapped in DistributedDataParallel.
    model = extract_model_from_parallel(text_encoder)
    return getattr(model, "text_model", model).final_layer_norm(hidden)


def compute_loss(unet, text_encoder, vae, noise_scheduler, batch: dict, settings: StepSettings,
                 mark: Callable[[str], None] = _no_mark, share: BatchShare = BatchShare()) -> torch.Tensor:
    """Noises the batch's latents, predicts with the UNet and returns the weighted loss (a 0-dim tensor).

    A reflow batch brings its latents and the noise they were generated from (utils.objective.flow) instead of pixels.
    `mark(phase)` is called as each phase has been queued (the benchmark times the phases with it).
    With several processes, `batch` is this process's `share` of the global batch; the random draws are the global
    batch's (see BatchShare) and a runt is weighed by the global batch's size, so the mean of the processes' losses
    is the loss one process would compute for the whole global batch.
    """
    if "latents" in batch:
        latents = batch["latents"].to(vae.device, torch.float32, non_blocking=True)
    else:
        latents = sample_latents(vae, batch_posterior(vae, batch), share=share).float()
    mark("vae")
    encoder_hidden_states = encode_text(text_encoder, batch["input_ids"], settings.clip_skip)
    if settings.embedding_perturbation > 0:  # perturbing zeros gives the global batch's perturbation alone
        encoder_hidden_states = encoder_hidden_states + share.mine(
            perturb_embedding(share.whole(encoder_hidden_states), settings.embedding_perturbation))
    mark("text_encoder")
    if "noise" in batch:
        noise = batch["noise"].to(latents.device, torch.float32, non_blocking=True)
    else:
        noise = share.mine(sample_noise(share.whole(latents), settings.zero_frequency_noise_ratio,
                                        settings.pyramid_noise_discount))
    timesteps = share.mine(sample_timesteps(latents.shape[0] * share.processes, settings.timestep_start,
                                            settings.timestep_end, latents.device))
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    noisy_latents, target = noised_and_target(noise_scheduler, latents, noise, timesteps, settings.rectified_flow)
    pred = predict(unet, noisy_latents, timesteps, encoder_hidden_states)
    weight = batch["loss_scale"].to(latents.device, non_blocking=True)
    if settings.min_snr_gamma and settings.rectified_flow:
        weight = weight * flow.min_snr_weight(timesteps, num_train_timesteps, settings.min_snr_gamma)
    elif settings.min_snr_gamma:
        weight = weight * min_snr_weight(noise_scheduler, timesteps, settings.min_snr_gamma)
    loss = diffusion_loss(pred, target, timesteps, settings.loss_type, weight, num_train_timesteps,
                          mask_weights(batch.get("loss_mask"), latents, settings.masked_loss_unmasked_weight))
    mark("unet")
    return loss * runt_weight(batch["runt_size"], settings.batch_size * share.processes)


def training_step(model, noise_scheduler, batch: dict, settings: StepSettings, accelerator, optimizers, *,
                  window: int, update: bool, clip_grad_norm: float | None,
                  mark: Callable[[str], None] = _no_mark) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
    """One batch: forward and loss under autocast, backward of loss / `window` (the gradient accumulation
    window), and with `update` the optimizer step; LR schedules advance every call. Returns the loss (detached,
    still on the device), the gradient norms of an update and whether it was made (False: gradients were not
    finite and the update was skipped).

    With several processes, `batch` is this process's share of the global batch (doc/MULTI_GPU.md) and the
    processes exchange gradients once per update: the window's earlier steps run under DDP's no_sync."""
    share = BatchShare(accelerator.process_index, accelerator.num_processes)
    with contextlib.ExitStack() as no_sync:
        if not update:
            for module in (model.unet, model.text_encoder):  # a frozen, unwrapped model has nothing to sync
                no_sync.enter_context(accelerator.no_sync(module))
        with accelerator.autocast():
            loss = compute_loss(model.unet, model.text_encoder, model.vae, noise_scheduler, batch, settings, mark,
                                share=share)
        with optimizers.backward_pass(update):
            accelerator.backward(loss / window)
    mark("backward")
    grad_norms, updated = optimizers.clip_and_step(accelerator.scaler, clip_grad_norm) if update else ({}, True)
    optimizers.step_schedules()
    mark("optimizer")
    return loss.detach(), grad_norms, updated
