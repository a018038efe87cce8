#!/usr/bin/env python
"""A real-size Stable Diffusion model (SD1.5, SD2 base or SD2.1-768-v architecture) with random weights.

For benchmarks and loading tests: speed and file formats do not depend on the weights, and no weights can be
downloaded here. Built from the configs shipped in utils/model/model_configs, on the meta device and then filled
in place, so it takes seconds.

    python scripts/make_random_sd.py --kind sd15 --out /tmp/sd15   # a diffusers folder
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.model import shipped  # noqa: E402


def random_sd(kind: str, dtype=torch.float16, seed: int = 0):
    """(unet, vae, text_encoder) of a shipped config, with seeded N(0, 0.02) weights."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = shipped.config_dir(kind)
    generator = torch.Generator().manual_seed(seed)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    for module in (unet, vae, text_encoder):
        module.to_empty(device="cpu").to(dtype)
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
    # The text encoder's position ids are a buffer outside the state dict, so to_empty left them uninitialised;
    # they index the position table.
    for name, buffer in text_encoder.named_buffers():
        if name.endswith("position_ids"):
            buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    return unet, vae, text_encoder


def save_random_sd(kind: str, out: Path) -> None:
    from diffusers import StableDiffusionPipeline

    unet, vae, text_encoder = random_sd(kind, dtype=torch.float32)
    scheduler_folder = shipped.config_dir(kind) / "scheduler"
    import diffusers

    scheduler_cls = getattr(diffusers, diffusers.DDIMScheduler.load_config(scheduler_folder)["_class_name"])
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, unet=unet,
                                   tokenizer=shipped.load_tokenizer("sd1" if kind == "sd15" else "sd2"),
                                   scheduler=scheduler_cls.from_pretrained(scheduler_folder), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=sorted(shipped.CONFIG_KINDS), default="sd15")
    parser.add_argument("--out", type=Path, required=True)
    cli = parser.parse_args()
    save_random_sd(cli.kind, cli.out)
    print(f"wrote {cli.out}")
