#!/usr/bin/env python
"""Build a tiny Stable Diffusion model offline (about a minute on 2 CPU cores) as a diffusers folder.

Same architecture family as SD 1.x (CLIP text encoder -> cross-attention UNet on 4-channel
latents of a factor-8 KL autoencoder), only tiny, so the trainer can be exercised on CPU:

* tokenizer: the shipped SD1 CLIP tokenizer (full 49408-token vocab, see utils/model/shipped.py);
* text encoder: CLIPTextModel, hidden 32, 2 layers, 4 heads, quick_gelu (seeded random);
* UNet: UNet2DConditionModel, block_out_channels (32, 64), cross-attention in both levels,
  cross_attention_dim 32, sample_size 16 (=128 px images) (seeded random);
* VAE: AutoencoderKL, 4 blocks (8, 16, 32, 32 channels; downsampling factor 8), 4 latent
  channels, *briefly trained* (300 Adam steps of reconstruction MSE, ~45 s single-threaded)
  on shape images rendered by scripts/make_demo_data.py (other seeds than demo/data), with
  the posterior log-variance pinned to -20 (std ~5e-5, nearly deterministic) and a
  ``scaling_factor`` chosen so that ``latent_dist.mean * scaling_factor`` has unit std.
  A random-init VAE is useless downstream: its posterior noise swamps what it keeps of the
  image, so a diffusion model trained on its latents cannot tell concepts apart.
  ``--vae_train_steps 0`` skips the training (build in a few seconds, blurry VAE).
* scheduler: DDIMScheduler, SD-style (scaled_linear 0.00085..0.012, 1000 steps).

    python scripts/make_tiny_model.py --out demo/tiny-sd [--prediction_type epsilon|v_prediction] [--seed 0]

Importable: ``build_tiny_pipeline(prediction_type="epsilon", seed=0)`` and
``save_tiny_model(out_dir, **kw)``.  Deterministic for a seed (the build runs single-threaded;
bit-exactness across different CPUs / torch builds is not guaranteed).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from utils.model.shipped import load_tokenizer, save_tokenizer_files  # noqa: E402

LOGVAR_BIAS = -20.0  # posterior std = exp(-10) ~ 4.5e-5 (before scaling)
VAE_TRAIN_STEPS = 300
VAE_BATCH = 8
VAE_CROP = 64  # train on random 64x64 crops of 128x128 images (4x cheaper, same shape scale)
VAE_LR = 1e-3
VAE_LATENT_NOISE = 0.05  # relative latent noise in training: decoder tolerates imperfect samples
VAE_TRAIN_SEED_OFFSET = 1000  # VAE training images differ from demo/data (seed 0)


@contextlib.contextmanager
def _build_env(seed: int):
    """Single-threaded torch with a private RNG state.

    One thread makes the result independent of the machine's core count (float reduction
    order) and avoids the slow-down of oversubscribed OpenMP threads when other jobs run.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def _demo_data_module():
    """Import the sibling scripts/make_demo_data.py without needing scripts/ to be a package."""
    spec = importlib.util.spec_from_file_location("_make_demo_data", Path(__file__).with_name("make_demo_data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _to_tensor(imgs) -> torch.Tensor:
    """PIL images (same size) -> float tensor (N, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in imgs])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def vae_training_images(seed: int = 0, n_per_concept: int = 16) -> torch.Tensor:
    """128x128 shape images (all four concepts) for the VAE, as a (N, 3, 128, 128) tensor."""
    dd = _demo_data_module()
    items = dd.render_dataset(seed=seed + VAE_TRAIN_SEED_OFFSET, n_square=n_per_concept, n_landscape=0, n_portrait=0)
    return _to_tensor([im for _, _, im in items])


def tiny_text_encoder(seed: int = 0):
    """Seeded random tiny CLIP text encoder (full 49408-token vocab, hidden 32, 2 layers)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=32,
        layer_norm_eps=1e-5,
        bos_token_id=0,  # as in the SD configs; eos_token_id=2 selects CLIP's legacy argmax pooling
        eos_token_id=2,
        pad_token_id=1,
    )
    with _build_env(seed):
        return CLIPTextModel(cfg).eval()


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32):
    """Seeded random tiny UNet2DConditionModel (16x16x4 latents = 128 px images)."""
    from diffusers import UNet2DConditionModel

    with _build_env(seed + 1):
        return UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=32,
        )


def tiny_vae(seed: int = 0):
    """Tiny KL autoencoder (4 blocks = factor 8, 4 latent channels), not yet trained.

    Initialisation (so a few hundred Adam steps suffice): every residual branch (resnet
    ``conv2``, attention ``to_out``) starts at zero, 1x1 shortcuts as identity, the encoder's
    stride-2 convs as 2x2 average pooling and the decoder's post-upsampling convs as identity,
    i.e. training starts from a near-linear "8x8 pooling" autoencoder.  ``norm_num_groups=1``:
    with few channels, per-channel GroupNorm throws away too much colour information.
    The posterior log-variance is pinned to LOGVAR_BIAS (see ``_pin_logvar``).
    """
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    with _build_env(seed + 2):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=1,
            sample_size=128,
        )
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, ResnetBlock2D):
                m.conv2.weight.zero_()
                m.conv2.bias.zero_()
                if m.conv_shortcut is not None:
                    w = m.conv_shortcut.weight
                    w.zero_()
                    n = min(w.shape[0], w.shape[1])
                    w[range(n), range(n), 0, 0] = 1.0
                    m.conv_shortcut.bias.zero_()
            elif isinstance(m, Attention):
                m.to_out[0].weight.zero_()
                m.to_out[0].bias.zero_()
            elif isinstance(m, Downsample2D):  # 3x3 stride 2, input padded (0, 1, 0, 1)
                w = m.conv.weight
                w.zero_()
                n = w.shape[0]
                for i in (0, 1):
                    for j in (0, 1):
                        w[range(n), range(n), i, j] = 0.25
                m.conv.bias.zero_()
            elif isinstance(m, Upsample2D):  # nearest x2, then 3x3 conv
                w = m.conv.weight
                w.zero_()
                w[range(w.shape[0]), range(w.shape[0]), 1, 1] = 1.0
                m.conv.bias.zero_()
    _pin_logvar(vae)
    return vae


@torch.no_grad()
def _pin_logvar(vae) -> None:
    """Make the posterior log-variance a constant LOGVAR_BIAS (std ~ 4.5e-5).

    ``encoder.conv_out`` emits 2C channels [mean, logvar]; in SD's AutoencoderKL the 1x1
    ``quant_conv`` then mixes them and *its* second half is the logvar that
    ``latent_dist`` uses, so that is where the weights are zeroed and the bias set.
    """
    c = vae.config.latent_channels
    conv = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder.conv_out
    conv.weight[c:].zero_()
    conv.bias[c:].fill_(LOGVAR_BIAS)


def _encode_mean(vae, x: torch.Tensor) -> torch.Tensor:
    return vae.encode(x).latent_dist.mean


@torch.no_grad()
def recon_mse(vae, images: torch.Tensor, batch: int = 16) -> float:
    """Mean squared reconstruction error (pixels in [-1, 1]) using the posterior mean."""
    errs = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        errs.append(((vae.decode(_encode_mean(vae, x)).sample - x) ** 2).mean(dim=(1, 2, 3)))
    return torch.cat(errs).mean().item()


@torch.no_grad()
def latent_std(vae, images: torch.Tensor, batch: int = 16) -> float:
    """Std of the (unscaled) posterior means over a set of images."""
    return torch.cat([_encode_mean(vae, images[i : i + batch]) for i in range(0, len(images), batch)]).std().item()


def train_vae(vae, images: torch.Tensor, steps: int = VAE_TRAIN_STEPS, seed: int = 0, log_every: int = 0):
    """Reconstruction-MSE training with Adam on random crops; the log-variance stays pinned."""
    g = torch.Generator().manual_seed(seed + 3)
    opt = torch.optim.Adam(vae.parameters(), lr=VAE_LR)
    # 20 warm-up steps, then cosine decay to 10% of VAE_LR
    lr_at = lambda s: min(1.0, (s + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * s / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    h, w = images.shape[-2:]
    vae.train()
    with _build_env(seed + 4):
        for step in range(steps):
            x = images[torch.randint(len(images), (VAE_BATCH,), generator=g)]
            i, j = (torch.randint(0, n - VAE_CROP + 1, (1,), generator=g).item() for n in (h, w))
            x = x[:, :, i : i + VAE_CROP, j : j + VAE_CROP]
            mean = _encode_mean(vae, x)
            z = mean + VAE_LATENT_NOISE * mean.detach().std() * torch.randn(mean.shape, generator=g)
            loss = torch.nn.functional.mse_loss(vae.decode(z).sample, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            _pin_logvar(vae)
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(f"  vae step {step:4d}  crop mse {loss.item():.4f}", flush=True)
    vae.eval()
    return vae


def build_tiny_vae(seed: int = 0, train_steps: int = VAE_TRAIN_STEPS, verbose: bool = False):
    """Tiny VAE, trained on shape images, with ``scaling_factor`` set for unit latent std.

    Returns (vae, stats); stats: reconstruction MSE on the 64 training images and on 64
    held-out images, before and after training, and the scaling factor.
    """
    images = vae_training_images(seed)
    held_out = vae_training_images(seed + 1)
    vae = tiny_vae(seed)
    with _build_env(seed):
        stats = {"mse_before": recon_mse(vae, images), "mse_before_heldout": recon_mse(vae, held_out)}
    if train_steps > 0:
        train_vae(vae, images, steps=train_steps, seed=seed, log_every=50 if verbose else 0)
        with _build_env(seed):
            stats["mse_after"] = recon_mse(vae, images)
            stats["mse_after_heldout"] = recon_mse(vae, held_out)
    else:
        stats["mse_after"], stats["mse_after_heldout"] = stats["mse_before"], stats["mse_before_heldout"]
    with _build_env(seed):
        scaling = 1.0 / latent_std(vae, images)
    vae.register_to_config(scaling_factor=float(f"{scaling:.5g}"))
    stats["scaling_factor"] = vae.config.scaling_factor
    return vae, stats


def scheduler_for(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_pipeline(prediction_type: str = "epsilon", seed: int = 0, vae_train_steps: int = VAE_TRAIN_STEPS,
                        verbose: bool = False):
    """Return a tiny fp32 ``StableDiffusionPipeline`` (CPU), deterministic for ``seed``.

    The VAE stats (reconstruction MSE before/after training, scaling factor) are attached as
    ``pipe.tiny_vae_stats`` (not saved).
    """
    from diffusers import StableDiffusionPipeline

    vae, stats = build_tiny_vae(seed, vae_train_steps, verbose=verbose)
    text_encoder = tiny_text_encoder(seed)
    unet = tiny_unet(seed, cross_attention_dim=text_encoder.config.hidden_size)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer("sd1"),
        unet=unet,
        scheduler=scheduler_for(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.tiny_vae_stats = stats
    return pipe


def save_tiny_model(out_dir: str | Path, **kw):
    """Build (``build_tiny_pipeline(**kw)``) and save as a diffusers folder (fp32 safetensors)."""
    pipe = build_tiny_pipeline(**kw)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    # vocab.json + merges.txt instead of transformers 5's tokenizer.json: smaller, and
    # loadable by transformers 4.x as well
    save_tokenizer_files(Path(out_dir) / "tokenizer", "sd1")
    return pipe


def main() -> None:
    p = argparse.ArgumentParser(description="Build a tiny Stable Diffusion pipeline folder (offline, CPU).")
    p.add_argument("--out", required=True)
    p.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae_train_steps", type=int, default=VAE_TRAIN_STEPS)
    a = p.parse_args()
    t0 = time.time()
    pipe = save_tiny_model(a.out, prediction_type=a.prediction_type, seed=a.seed,
                           vae_train_steps=a.vae_train_steps, verbose=True)
    s = pipe.tiny_vae_stats
    n = {k: sum(t.numel() for t in getattr(pipe, k).parameters()) for k in ("unet", "vae", "text_encoder")}
    print(f"VAE reconstruction MSE (pixels in [-1,1]): untrained {s['mse_before']:.4f} -> trained {s['mse_after']:.4f} "
          f"(held-out images: {s['mse_before_heldout']:.4f} -> {s['mse_after_heldout']:.4f}); "
          f"scaling_factor {s['scaling_factor']}")
    print("params: " + ", ".join(f"{k} {v:,}" for k, v in n.items()))
    print(f"saved to {a.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
