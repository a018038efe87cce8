#!/usr/bin/env python
"""Pretrain the demo's base model, demo/tiny-shapes: the tiny SD architecture of make_tiny_model.py taught the
shapes world's known concepts (red, blue, green and yellow circles, squares, triangles and crosses), so that the
demo fine-tunes a model that already draws what it is asked, as real fine-tuning does (doc/EVALUATION.md).

1. The VAE is trained on every colour of the world (purple too: like SD's VAE, it can draw colours the diffusion
   model never learned), with make_tiny_model.py's recipe, on the GPU when there is one.
2. The UNet and text encoder start from make_tiny_model.py's seeded random weights and are trained by this
   trainer itself (train.py) on rendered images of the known concepts.

    python scripts/pretrain_tiny_shapes.py --out demo/tiny-shapes [--steps 6000] [--seed 0]

About 10 minutes on one GPU; far too slow on a CPU. Deterministic for a seed up to the GPU's own nondeterminism.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import make_demo_data as world  # noqa: E402
import make_tiny_model as tiny  # noqa: E402

KNOWN_COLOURS = ("red", "blue", "green", "yellow")  # purple is left for the demo to teach
IMAGES_PER_CONCEPT = 128
VAE_BATCH, VAE_LR = 32, 1e-3
# Offset noise hides an image's mean colour from the noisy latent, so the model must take colour from the caption
# rather than read it from the noise it denoises (colour then follows the prompt, not the sampling seed).
ZERO_FREQUENCY_NOISE = 0.1


def render(colours, per_concept: int, seed: int, size: int) -> list:
    rng = random.Random(seed)
    return [(f"a {colour} {shape}", world.render_shape(colour, shape, (size, size), rng))
            for colour in colours for shape in world.SHAPES for _ in range(per_concept)]


def train_vae(seed: int, steps: int, size: int, device: torch.device):
    """make_tiny_model.py's VAE and loss (MSE on 64 px crops, a little latent noise, pinned log-variance), longer
    and on every colour of the world."""
    images = tiny._to_tensor([image for _, image in render(world.PALETTE, 24, seed + 1000, size)]).to(device)
    vae = tiny.tiny_vae(seed).to(device).train()
    generator = torch.Generator(device=device).manual_seed(seed + 3)
    optimizer = torch.optim.Adam(vae.parameters(), lr=VAE_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) *
                                                 (0.55 + 0.45 * math.cos(math.pi * s / steps)))
    for step in range(steps):
        batch = images[torch.randint(len(images), (VAE_BATCH,), generator=generator, device=device)]
        i, j = (int(torch.randint(0, size - tiny.VAE_CROP + 1, (1,), generator=generator, device=device))
                for _ in range(2))
        x = batch[:, :, i:i + tiny.VAE_CROP, j:j + tiny.VAE_CROP]
        mean = tiny._encode_mean(vae, x)
        z = mean + tiny.VAE_LATENT_NOISE * mean.detach().std() * torch.randn(mean.shape, generator=generator,
                                                                             device=device)
        loss = torch.nn.functional.mse_loss(vae.decode(z).sample, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        tiny._pin_logvar(vae)
        if step % 500 == 0 or step == steps - 1:
            print(f"vae step {step}: crop mse {loss.item():.4f}", flush=True)
    vae.eval()
    with torch.no_grad():
        std = torch.cat([tiny._encode_mean(vae, images[k:k + 64]) for k in range(0, len(images), 64)]).std()
    vae.register_to_config(scaling_factor=float(f"{1 / std.item():.5g}"))
    return vae.cpu()


def random_base(folder: Path, seed: int, vae_steps: int, size: int, device: torch.device) -> None:
    """make_tiny_model.py's model with the world's VAE."""
    pipe = tiny.build_tiny_pipeline(seed=seed, vae_train_steps=0)
    pipe.vae = train_vae(seed, vae_steps, size, device)
    pipe.unet.register_to_config(sample_size=size // 8)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    tiny.save_tokenizer_files(folder / "tokenizer", "sd1")


def write_data(folder: Path, seed: int, size: int) -> None:
    folder.mkdir(parents=True)
    for n, (caption, image) in enumerate(render(KNOWN_COLOURS, IMAGES_PER_CONCEPT, seed, size)):
        image.save(folder / f"{n:04d}.png")
        (folder / f"{n:04d}.txt").write_text(caption + "\n")


def pretrain(base: Path, data: Path, work: Path, steps: int, batch: int, size: int, seed: int) -> Path:
    """UNet and text encoder through train.py; returns the final diffusers folder."""
    import train

    steps_per_epoch = len(world.SHAPES) * len(KNOWN_COLOURS) * IMAGES_PER_CONCEPT // batch
    optimizer = work / "optimizer.json"
    optimizer.write_text(json.dumps({"base": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0,
                                              "lr_scheduler": "cosine", "lr_warmup_steps": 200}}))
    status = train.main([
        "--resume_ckpt", str(base), "--data_root", str(data), "--resolution", str(size), "--batch_size", str(batch),
        "--max_epochs", str(math.ceil(steps / steps_per_epoch)), "--optimizer_config", str(optimizer),
        "--lr_decay_steps", str(steps), "--cond_dropout", "0.1", "--loss_type", "mse",
        "--zero_frequency_noise_ratio", str(ZERO_FREQUENCY_NOISE), "--cache_latents", "--sample_steps", "0",
        "--no-generate_pretrain_samples", "--log_step", "100", "--logdir", str(work / "logs"), "--project_name",
        "shapes", "--seed", str(seed), "--no_save_ckpt", "--no_prepend_last"])
    (run,) = (work / "logs").glob("shapes_*")
    saved = [p for p in (run / "ckpts").iterdir() if p.is_dir()]
    if status != 0 and not (status > 128 and saved):  # a signal (Ctrl-C) saves where it stopped: keep that
        raise SystemExit(f"pretraining failed with exit code {status}")
    return max(saved, key=lambda p: p.stat().st_mtime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo/tiny-shapes")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--vae_steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=128, choices=(64, 128))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="keep the pretraining run (logs, data) here instead of a temporary folder")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        random_base(work / "base", args.seed, args.vae_steps, args.resolution, device)
        print(f"VAE trained in {time.time() - started:.0f} s", flush=True)
        write_data(work / "data", args.seed, args.resolution)
        final = pretrain(work / "base", work / "data", work, args.steps, args.batch_size, args.resolution, args.seed)
        out = Path(args.out)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(final, out, ignore=shutil.ignore_patterns("*.pt", "ldm_carried.safetensors", "tokenizer"))
        shutil.copytree(work / "base" / "tokenizer", out / "tokenizer")  # vocab.json + merges.txt, as demo/tiny-sd
    print(f"saved {out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
