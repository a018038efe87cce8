"""Rectified flow and reflow (Liu et al. 2022, "Flow Straight and Fast"); doc/RECTIFIED_FLOW.md explains the
conventions and how to use them.

Convention: sigma in [0, 1] is the noise level. A training point is x_sigma = (1 - sigma) * latents +
sigma * noise, the UNet is called with timestep sigma * num_train_timesteps (high = noisy, as a pretrained
model reads it) and learns the velocity d x_sigma / d sigma = noise - latents. The specification's t (1 at the
clean image) is 1 - sigma and its target x1 - x0 is the negative of ours: the same straight paths and ODE,
in the timestep direction and sign a v-prediction model already uses. It is diffusers' `flow_prediction`
convention, so `DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
solver_order=1)` samples it in a stock `StableDiffusionPipeline`: its first-order step on flow sigmas is the
Euler step x <- x + (sigma_next - sigma) * v.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from diffusers import DPMSolverMultistepScheduler
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from utils.objective.prediction import predict
from utils.options.config import ConfigError

log = logging.getLogger(__name__)

# Reflow pairs larger than this (noise + generated latents, float32) go to disk in the run folder instead of
# host memory: 2 GiB is about 16,000 pairs of SD at 512 px (128 KiB each), comfortable next to a training run.
PAIRS_MEMORY_LIMIT_BYTES = 2 * 2**30
DEFAULT_REFLOW_SAMPLE_STEPS = 50
SAMPLER_NOTE = ("rectified flow: sample with an Euler (flow-matching) sampler over the noise level sigma from 1 to 0, "
                "UNet timestep = sigma * 1000, denoised = x - sigma * output; in diffusers "
                "DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type='flow_prediction', solver_order=1)")


# -- options and model -----------------------------------------------------------------------------------------

class ModelMismatch(Exception):
    """The model's prediction type does not suit the objective; the message says what to do."""


def check_options(args) -> None:
    """Flag combinations that cannot work, refused before any model loads."""
    where = args.sources.get
    if args.reflow_steps and not args.rectified_flow:
        raise ConfigError(f"{where('reflow_steps', 'defaults')}: reflow_steps {args.reflow_steps} needs rectified_flow "
                          "(reflow retrains a rectified-flow model on its own samples). Set rectified_flow: true or "
                          "reflow_steps: 0.")
    if args.rectified_flow and args.enable_zero_terminal_snr:
        raise ConfigError(f"{where('enable_zero_terminal_snr', 'defaults')}: enable_zero_terminal_snr rescales the "
                          "diffusion (beta) schedule, which rectified_flow does not use: its paths already end in "
                          "pure noise. Turn one of them off.")


def is_flow_model(scheduler_config) -> bool:
    return scheduler_config.get("prediction_type") == "flow_prediction"


# DPMSolverMultistepScheduler with these options is the sampler of a rectified-flow model: at first order its step
# is Euler's over the noise level. Betas and zero-SNR rescaling of the config it comes from have no part in flow
# sigmas and are dropped.
FLOW_SAMPLER_OPTIONS = {"use_flow_sigmas": True, "flow_shift": 1.0, "prediction_type": "flow_prediction",
                        "solver_order": 1, "rescale_betas_zero_snr": False}


def flow_scheduler(scheduler_config) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler.from_config(scheduler_config, **FLOW_SAMPLER_OPTIONS)


def configure_model(model, args) -> None:
    """Checks the model suits the objective and, for rectified flow, gives it the flow sampler, which the samples
    and every saved checkpoint then use."""
    if not args.rectified_flow:
        if is_flow_model(model.scheduler.config):
            raise ModelMismatch(f"{model.source} was trained with rectified flow (its scheduler's prediction_type "
                                "is flow_prediction). Set rectified_flow: true to keep training it.")
        return
    if model.prediction_type not in ("v_prediction", "v-prediction", "flow_prediction"):
        raise ModelMismatch(f"rectified_flow needs a v-prediction model; {model.source} has prediction_type "
                            f"'{model.prediction_type}' in its scheduler config. Start from a v-prediction model "
                            "(e.g. SD 2.x 768-v) or turn rectified_flow off.")
    if args.reflow_steps and not is_flow_model(model.scheduler.config):
        log.warning("reflow_steps: reflow runs before the main epochs and samples %s as a flow model, which it is "
                    "not yet (prediction_type %s): its pairs will be poor. Train with rectified_flow first, then run "
                    "reflow from that checkpoint.", model.source, model.prediction_type)
    model.scheduler = flow_scheduler(model.scheduler.config)


def single_file_metadata(scheduler_config) -> dict[str, str]:
    """Tells other programs loading a single file how to sample it (they do not read our configs)."""
    return {"sampler": SAMPLER_NOTE} if is_flow_model(scheduler_config) else {}


# -- the objective ---------------------------------------------------------------------------------------------

def noise_level(timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """sigma = timestep / num_train_timesteps, shaped to broadcast over (B, C, H, W)."""
    return (timesteps.float() / num_train_timesteps).view(-1, 1, 1, 1)


def interpolate(latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (1 - sigma) * latents + sigma * noise


def velocity(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The target: d x_sigma / d sigma along the straight path."""
    return noise - latents


def training_pair(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the UNet's input, its target) for clean latents, noise and integer timesteps."""
    sigma = noise_level(timesteps, num_train_timesteps)
    return interpolate(latents, noise, sigma), velocity(latents, noise)


def min_snr_weight(timesteps: torch.Tensor, num_train_timesteps: int, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma (arXiv 2303.09556) for the flow target: the paper weights each point's error on the clean
    image by min(SNR, gamma). On the path SNR = ((1 - sigma) / sigma)^2 and the clean-image error is sigma times
    the velocity error, so the velocity loss is weighted sigma^2 * min(SNR, gamma) = min((1 - sigma)^2,
    gamma * sigma^2)."""
    sigma = timesteps.float() / num_train_timesteps
    return torch.minimum((1 - sigma) ** 2, gamma * sigma ** 2)


# -- sampling and straightness ---------------------------------------------------------------------------------

@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module):
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)


@torch.no_grad()
def sample(unet, prompt_embeds: torch.Tensor, noise: torch.Tensor, steps: int, scheduler_config,
           velocities: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrates the flow ODE from `noise` with `steps` Euler steps, exactly as a StableDiffusionPipeline with
    `flow_scheduler` does without guidance. Returns (latents, the sigmas stepped through, last 0); the UNet's
    velocity at each step is appended to `velocities` when given."""
    scheduler = flow_scheduler(scheduler_config)
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise.float() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        # In float32: under half-precision autocast the step would round x to the UNet's output type, and a
        # 1/steps-sized step is near half precision's resolution (bfloat16 resolves 1/256 at 1).
        v = predict(unet, scheduler.scale_model_input(x, t), t, prompt_embeds)
        if velocities is not None:
            velocities.append(v)
        x = scheduler.step(v, t, x).prev_sample
    return x, scheduler.sigmas


def straightness(velocities: list[torch.Tensor], sigmas: torch.Tensor) -> float:
    """Liu et al.'s S = integral over the path of E||(x_end - x_start) / (sigma_end - sigma_start) - v||^2 for
    Euler steps: each step's velocity against the secant velocity (the step-length-weighted mean of the
    velocities, which is what Euler integration makes of x_end - x_start), weighted by step length; the squared
    error is averaged per element. Zero exactly when every step moves in the same direction at the same speed."""
    steps = (sigmas[:-1] - sigmas[1:]).tolist()
    secant = sum(dt * v for dt, v in zip(steps, velocities)) / sum(steps)
    return sum(dt * (v - secant).pow(2).mean().item() for dt, v in zip(steps, velocities)) / sum(steps)


@dataclass
class FlowMeasures:
    straightness: float
    one_step_error: float  # mean squared distance of the one-step Euler sample to the many-step one


@torch.no_grad()
def measure(unet, prompt_embeds: torch.Tensor, noise: torch.Tensor, steps: int, scheduler_config) -> FlowMeasures:
    """Straightness of the model's own ODE paths from `noise`, and how far one Euler step lands from `steps`."""
    velocities = []
    many, sigmas = sample(unet, prompt_embeds, noise, steps, scheduler_config, velocities)
    one, _ = sample(unet, prompt_embeds, noise, 1, scheduler_config)
    return FlowMeasures(straightness(velocities, sigmas), (one - many).pow(2).mean().item())


# -- reflow ----------------------------------------------------------------------------------------------------

def reflow_sample_steps(args) -> int:
    """reflow_sample_steps, else sample_steps (the sampling interval, as EveryDream2's branch reads it), else 50."""
    return args.reflow_sample_steps or args.sample_steps or DEFAULT_REFLOW_SAMPLE_STEPS


@dataclass
class PromptBatch:
    """What reflow keeps of a training batch: its tokens and captions, and the latent size of its bucket."""
    input_ids: torch.Tensor
    captions: list[str]
    latent_shape: tuple[int, ...]


def prompt_batches(loader: Iterable[dict], count: int, vae_config) -> list[PromptBatch]:
    """The first `count` batches of `loader`, going through it again while more are needed."""
    scale = 2 ** (len(vae_config.block_out_channels) - 1)
    batches = []
    while len(batches) < count:
        before = len(batches)
        for batch in loader:
            b, _, h, w = batch["pixel_values"].shape
            batches.append(PromptBatch(batch["input_ids"], batch["captions"],
                                       (b, vae_config.latent_channels, h // scale, w // scale)))
            if len(batches) == count:
                break
        if len(batches) == before:
            raise ValueError("the training data gave no batch to generate reflow pairs from")
    return batches


class ReflowPairs:
    """Generated (noise, latents) pairs with the tokens and captions they were generated for, one part per
    generated batch, in host memory or, with `folder`, one safetensors file per part there."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self.parts: list[dict | Path] = []
        self.shapes: list[tuple[int, ...]] = []
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def bytes_needed(prompts: list[PromptBatch]) -> int:
        return sum(2 * 4 * math.prod(p.latent_shape) for p in prompts)

    def add(self, noise: torch.Tensor, latents: torch.Tensor, input_ids: torch.Tensor, captions: list[str]) -> None:
        tensors = {"noise": noise.float().cpu().contiguous(), "latents": latents.float().cpu().contiguous(),
                   "input_ids": input_ids.cpu().contiguous()}
        self.shapes.append(tuple(tensors["latents"].shape))
        if self.folder is None:
            self.parts.append(tensors | {"captions": list(captions)})
            return
        file = self.folder / f"pairs_{len(self.parts):05d}.safetensors"
        save_file(tensors, str(file), metadata={"captions": json.dumps(list(captions))})
        self.parts.append(file)

    def __len__(self) -> int:
        return sum(shape[0] for shape in self.shapes)

    def epoch(self, batch_size: int, generator: torch.Generator) -> list[list[tuple[int, int]]]:
        """One pass in random order: batches of (part, row), each of one latent size (buckets stay apart), the
        last batch of each size possibly smaller."""
        by_shape: dict[tuple, list[tuple[int, int]]] = {}
        for part, shape in enumerate(self.shapes):
            by_shape.setdefault(shape[1:], []).extend((part, row) for row in range(shape[0]))
        batches = []
        for rows in by_shape.values():
            order = torch.randperm(len(rows), generator=generator).tolist()
            shuffled = [rows[i] for i in order]
            batches += [shuffled[i:i + batch_size] for i in range(0, len(shuffled), batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def batch(self, rows: list[tuple[int, int]]) -> dict:
        """A training batch for compute_loss: the pair's latents and noise replace pixels and fresh noise."""
        picked = {"noise": [], "latents": [], "input_ids": [], "captions": []}
        for part, row in rows:
            stored = self.parts[part]
            if isinstance(stored, dict):
                for key in ("noise", "latents", "input_ids"):
                    picked[key].append(stored[key][row:row + 1])
                picked["captions"].append(stored["captions"][row])
            else:
                with safe_open(stored, framework="pt") as f:
                    for key in ("noise", "latents", "input_ids"):
                        picked[key].append(f.get_slice(key)[row:row + 1])
                    picked["captions"].append(json.loads(f.metadata()["captions"])[row])
        batch = {key: torch.cat(picked[key]) for key in ("noise", "latents", "input_ids")}
        return batch | {"captions": picked["captions"], "runt_size": 0,
                        "loss_scale": torch.ones(len(rows), dtype=torch.float32)}

    def discard(self) -> None:
        self.parts.clear()
        self.shapes.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def new_pairs_store(prompts: list[PromptBatch], run_folder: Path,
                    memory_limit: int = PAIRS_MEMORY_LIMIT_BYTES) -> ReflowPairs:
    """In memory when the pairs fit `memory_limit`, else on disk under the run folder (removed when discarded)."""
    size = ReflowPairs.bytes_needed(prompts)
    folder = None if size <= memory_limit else run_folder / "reflow_pairs"
    log.info("Reflow pairs: %.1f MiB, kept %s", size / 2**20, f"on disk in {folder}" if folder else "in memory")
    return ReflowPairs(folder)


@torch.no_grad()
def generate_pairs(unet, embed: Callable[[torch.Tensor], torch.Tensor], prompts: list[PromptBatch], steps: int,
                   scheduler_config, generator: torch.Generator, store: ReflowPairs, autocast,
                   description: str) -> None:
    """Reflow's phase 1: for each prompt batch, fresh Gaussian noise integrated by the model's ODE to a latent,
    added to `store`."""
    device = unet.device
    for prompt in tqdm(prompts, desc=description, unit="batch", leave=False, dynamic_ncols=True):
        noise = torch.randn(prompt.latent_shape, generator=generator, device=generator.device).to(device)
        with autocast():
            latents, _ = sample(unet, embed(prompt.input_ids), noise, steps, scheduler_config)
        store.add(noise, latents, prompt.input_ids, prompt.captions)
