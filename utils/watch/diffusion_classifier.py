"""The diffusion classifier (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier",
arXiv 2303.16203): a text-to-image model classifies an image by the caption under which it denoises the image
best. Over held-out captioned images, how often that is the image's own caption measures how well the model ties
captions to what they describe; doc/EVALUATION.md explains how to run and read it.

Each image is noised at `trials` (timestep, noise) pairs and the model predicts the objective's target (epsilon,
v or flow velocity, as `noised_and_target` gives it, the same call training and validation make) under every
candidate caption; the caption with the lowest mean squared error wins. The pairs are the same for every caption,
so the losses differ only through the caption: with fresh draws per caption, draw-to-draw noise would swamp the
caption's effect.

Use:
    report = evaluate(models.load(path), "held_out/", trials=32, resolution=512)
    print(report.table())
or, to check the data before loading a model (as scripts/evaluate.py does):
    held_out = read_held_out("held_out/", 512, captions)   # EvaluationError for unusable data or captions
    report = score(model, held_out, trials=32)
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data
from data.images import load_training_image
from utils.objective import flow
from utils.objective.objectives import noised_and_target
from utils.objective.step import encode_text

log = logging.getLogger(__name__)


class EvaluationError(Exception):
    """Held-out data or candidate captions that cannot be evaluated; the message names them and says why."""


# -- scoring images under candidate captions -------------------------------------------------------------------

@dataclass
class Scores:
    captions: list[str]
    losses: torch.Tensor  # [images, captions]: each image's mean denoising error under each caption, on the CPU

    @property
    def predictions(self) -> list[int]:
        """Per image, the index of the caption with the lowest loss."""
        return self.losses.argmin(dim=1).tolist()


def draws(generator: torch.Generator, latent_shape: Sequence[int], trials: int,
          num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (timesteps, noise) pairs one image is scored with under every caption: the middles of `trials` equal
    slices of the schedule (evenly spaced, as in Li et al.) and fresh noise from `generator`."""
    timesteps = ((torch.arange(trials) + 0.5) * num_train_timesteps / trials).long()
    return timesteps, torch.randn((trials, *latent_shape), generator=generator)


def place(model, device) -> torch.device:
    """Moves the model's parts to `device` (None: where its UNet is) and returns that device."""
    device = torch.device(device) if device is not None else model.unet.device
    for part in (model.unet, model.text_encoder, model.vae):
        part.to(device)
    return device


def embed_captions(model, captions: Sequence[str], clip_skip: int) -> torch.Tensor:
    """The UNet's conditioning for each caption, tokenized as the training loader does."""
    return encode_text(model.text_encoder, data.token_ids(model.tokenizer, captions), clip_skip)


def image_losses(unet, noise_scheduler, rectified_flow: bool, latent: torch.Tensor, hidden: torch.Tensor,
                 pairs: tuple[torch.Tensor, torch.Tensor], batch_size: int) -> torch.Tensor:
    """One image's loss under each caption of `hidden`, averaged over the (timesteps, noise) `pairs`. The UNet
    sees the (caption, pair) combinations in batches of `batch_size`, whichever captions and pairs they mix."""
    timesteps, noise = (tensor.to(latent.device) for tensor in pairs)
    trials, captions = len(timesteps), len(hidden)
    noisy, target = noised_and_target(noise_scheduler, latent.expand(trials, *latent.shape), noise, timesteps,
                                      rectified_flow)
    caption_of_row = torch.arange(captions, device=latent.device).repeat_interleave(trials)
    trial_of_row = torch.arange(trials, device=latent.device).repeat(captions)
    errors = []
    for start in range(0, captions * trials, batch_size):
        caption, trial = caption_of_row[start:start + batch_size], trial_of_row[start:start + batch_size]
        pred = unet(noisy[trial], timesteps[trial], hidden[caption]).sample
        errors.append(F.mse_loss(pred.float(), target[trial].float(), reduction="none").mean(dim=(1, 2, 3)))
    return torch.cat(errors).view(captions, trials).mean(dim=1)


@torch.no_grad()
def classify(model, latents: Iterable[torch.Tensor], captions: Sequence[str], trials: int = 32, seed: int = 0,
             batch_size: int = 32, device=None, clip_skip: int = 0) -> Scores:
    """Scores each image (scaled VAE latents [C, h, w]; sizes may differ, a [N, C, h, w] tensor works) under each
    caption: its denoising loss over `trials` (timestep, noise) pairs shared by all captions (`draws`). The noise
    comes from a CPU generator seeded with `seed`, image after image, so the same inputs give the same losses on
    any device. `model` is a models.StableDiffusion, moved to `device` (None: where it is) and evaluated in eval
    mode; rectified-flow models are scored against their velocity target."""
    device = place(model, device)
    noise_scheduler = model.noise_scheduler("ddpm")  # the betas and prediction type the model was trained with
    rectified_flow = flow.is_flow_model(model.scheduler.config)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    generator = torch.Generator().manual_seed(seed)
    with flow.eval_mode(model.unet, model.text_encoder):
        hidden = embed_captions(model, captions, clip_skip)
        losses = [image_losses(model.unet, noise_scheduler, rectified_flow, latent.to(device, torch.float32), hidden,
                               draws(generator, latent.shape, trials, num_train_timesteps), batch_size).cpu()
                  for latent in tqdm(latents, desc="classify", unit="image", leave=False, dynamic_ncols=True)]
    return Scores(list(captions), torch.stack(losses) if losses else torch.empty(0, len(captions)))


# -- held-out data ---------------------------------------------------------------------------------------------

@dataclass
class HeldOut:
    records: list[data.ImageRecord]  # the images whose caption is a candidate, bucketed at the resolution
    candidates: list[str]
    truth: list[int]  # each record's own caption, as an index into candidates
    left_out: int = 0  # images whose caption is not a candidate


def read_held_out(data_root: str | Path, resolution: int, captions: Sequence[str] | None = None) -> HeldOut:
    """The captioned images of `data_root` (a folder or manifest .json, read as for training) and the candidate
    captions: `captions` without repeats, or the distinct captions of the images. Needs no model; raises
    EvaluationError when there are no usable images, fewer than two candidates, or no image with a candidate
    caption."""
    try:
        scanned = data.scan(str(data_root))
    except data.DataError as e:
        raise EvaluationError(str(e)) from None
    for line in scanned.summary_lines():
        log.warning("%s: %s", data_root, line)
    if not scanned.records:
        raise EvaluationError(f"{data_root}: no usable images. Put held-out images there, each with its caption in a "
                              ".txt file of the same name.")
    records = data.assign_buckets(scanned.records, resolution)
    candidates = list(dict.fromkeys(captions)) if captions else sorted({r.caption.text() for r in records})
    if len(candidates) < 2:
        where = "--captions" if captions else f"the captions of {data_root}"
        raise EvaluationError(f"{where}: {len(candidates)} distinct caption(s) ({'; '.join(candidates)}); telling "
                              "captions apart needs at least 2 candidates.")
    kept = [r for r in records if r.caption.text() in candidates]
    if not kept:
        raise EvaluationError(f"{data_root}: no image has one of the candidate captions as its caption, so none can "
                              "be scored right or wrong. Give the images' own captions among --captions.")
    return HeldOut(kept, candidates, [candidates.index(r.caption.text()) for r in kept], len(records) - len(kept))


@torch.no_grad()
def image_latent(vae, record: data.ImageRecord, seed: int) -> torch.Tensor:
    """The image cropped and resized to its bucket as validation does (no crop jitter; the crop offset from
    `seed`), encoded to the VAE posterior's mean times the scaling factor: Li et al. use the mean, which leaves
    the noise pairs as the only randomness."""
    pixels = load_training_image(record.path, record.bucket, random.Random(seed), jitter=False)
    mean = vae.encode(pixels[None].to(vae.device, vae.dtype)).latent_dist.mean
    return (mean * vae.config.scaling_factor)[0].float()


# -- the report ------------------------------------------------------------------------------------------------

@dataclass
class Report:
    scores: Scores
    paths: list[str]
    truth: list[int]
    left_out: int = 0

    @property
    def candidates(self) -> list[str]:
        return self.scores.captions

    @property
    def predictions(self) -> list[int]:
        return self.scores.predictions

    @property
    def correct(self) -> int:
        return sum(p == t for p, t in zip(self.predictions, self.truth))

    @property
    def accuracy(self) -> float:
        return self.correct / len(self.truth)

    @property
    def chance(self) -> float:
        return 1 / len(self.candidates)

    @property
    def confusion(self) -> list[list[int]]:
        """confusion[i][j]: how many images of caption i were given caption j."""
        counts = [[0] * len(self.candidates) for _ in self.candidates]
        for t, p in zip(self.truth, self.predictions):
            counts[t][p] += 1
        return counts

    def per_caption(self) -> dict[str, tuple[int, float | None]]:
        """caption -> (images with that caption, the fraction of them classified right; None without images)."""
        rows = {}
        for i, (caption, counts) in enumerate(zip(self.candidates, self.confusion)):
            images = sum(counts)
            rows[caption] = (images, counts[i] / images if images else None)
        return rows

    def table(self) -> str:
        width = max(len("caption"), *(len(c) for c in self.candidates))
        lines = [f"{'caption':<{width}}  images  accuracy"]
        for caption, (images, accuracy) in self.per_caption().items():
            lines.append(f"{caption:<{width}}  {images:>6}  {'-' if accuracy is None else f'{accuracy:.3f}':>8}")
        if self.left_out:
            lines.append(f"({self.left_out} image(s) left out: their caption is not a candidate)")
        lines.append(f"overall accuracy: {self.accuracy:.3f} ({self.correct} of {len(self.truth)} images; chance "
                     f"{self.chance:.3f} with {len(self.candidates)} captions)")
        return "\n".join(lines)


def score(model, held_out: HeldOut, trials: int = 32, seed: int = 0, batch_size: int = 32, device=None,
          clip_skip: int = 0) -> Report:
    """Classifies every held-out image among its candidates (see `classify`)."""
    place(model, device)
    with flow.eval_mode(model.vae):
        latents = [image_latent(model.vae, record, seed) for record in held_out.records]
    scores = classify(model, latents, held_out.candidates, trials, seed, batch_size, device, clip_skip)
    return Report(scores, [r.path for r in held_out.records], held_out.truth, held_out.left_out)


def evaluate(model, data_root: str | Path, captions: Sequence[str] | None = None, trials: int = 32,
             resolution: int = 512, seed: int = 0, batch_size: int = 32, device=None, clip_skip: int = 0) -> Report:
    """The diffusion-classifier accuracy of `model` (a models.StableDiffusion) on the captioned images of
    `data_root`, which it should not have trained on. Candidates default to the images' distinct captions."""
    return score(model, read_held_out(data_root, resolution, captions), trials, seed, batch_size, device, clip_skip)
