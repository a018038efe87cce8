"""Sample images during training, so users can watch the model learn (REFERENCE.md §5, first version)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image, ImageDraw, ImageFont

from utils import flow

log = logging.getLogger(__name__)

GUIDANCE_SCALES = (7.0, 4.0, 1.01)
INFERENCE_STEPS = 30
# Lin et al. 2023 §3.4: classifier-free guidance rescaled against the overexposure zero-terminal-SNR models show
# at high guidance; 0.7 as the paper and EveryDream2 use.
ZERO_SNR_GUIDANCE_RESCALE = 0.7


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; an empty list (missing or empty file) means: use captions of the current batch."""
    path = Path(path)
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def _file_stem(prompt: str) -> str:
    return re.sub(r"[^A-Za-z0-9 ]", "", prompt)[:100].rstrip()


def _label(tile: Image.Image, text: str) -> Image.Image:
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 4
    x, y = tile.width - w, tile.height - h
    draw.rectangle((x, y, tile.width, tile.height), fill="white")
    draw.text((x + 2 - left, y + 2 - top), text, fill="black", font=font)
    return tile


@torch.no_grad()
def generate_samples(model, unet, text_encoder, prompts: list[str], *, size: int, seed: int, step: int,
                     out_dir: Path, tb_writer, autocast, clip_skip: int = 0) -> list[Path]:
    """Renders each prompt once per guidance scale into a labelled strip; saves JPEG + .txt and logs to TensorBoard.

    Runs with the random state forked, so training after a sample is the same as without it.
    """
    # A rectified-flow model is sampled with the flow ODE solver it was trained for.
    scheduler = flow.flow_scheduler(model.scheduler.config) if flow.is_flow_model(model.scheduler.config) else \
        DDIMScheduler.from_config(model.scheduler.config)
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=text_encoder, tokenizer=model.tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # The sampler follows the model's scheduler config (its betas and timestep spacing), as the saved model will.
    guidance_rescale = ZERO_SNR_GUIDANCE_RESCALE if pipe.scheduler.config.get("rescale_betas_zero_snr") else 0.0
    was_training = (unet.training, text_encoder.training)
    unet.eval()
    text_encoder.eval()
    device = unet.device
    strips = [[] for _ in prompts]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), autocast():
        for scale in GUIDANCE_SCALES:
            generators = [torch.Generator(device).manual_seed(seed) for _ in prompts]
            images = pipe(prompts, height=size, width=size, num_inference_steps=INFERENCE_STEPS,
                          guidance_scale=scale, guidance_rescale=guidance_rescale, generator=generators,
                          clip_skip=clip_skip - 1 if clip_skip >= 2 else None).images  # diffusers counts from 0
            for strip, image in zip(strips, images):
                strip.append(_label(image, f"cfg:{scale:.1f}"))
    unet.train(was_training[0])
    text_encoder.train(was_training[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for idx, (prompt, tiles) in enumerate(zip(prompts, strips)):
        strip = Image.new("RGB", (sum(t.width for t in tiles), tiles[0].height), "white")
        x = 0
        for tile in tiles:
            strip.paste(tile, (x, 0))
            x += tile.width
        stem = f"gs{step:05d}-{idx:03d}-{_file_stem(prompt)}"
        strip.save(out_dir / f"{stem}.jpg", quality=95)
        (out_dir / f"{stem}.txt").write_text(f"{prompt}\nseed: {seed}\n", encoding="utf-8")
        tb_writer.add_image(f"sample_{idx:03d}_{_file_stem(prompt)}", np.asarray(strip), step, dataformats="HWC")
        written.append(out_dir / f"{stem}.jpg")
    return written
