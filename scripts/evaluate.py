#!/usr/bin/env python
"""How well a model tells captions apart on held-out images: the diffusion classifier (doc/EVALUATION.md).

    python scripts/evaluate.py --model PATH --data_root DIR [--captions "a red circle" "a blue square" ...]
                               [--trials 32] [--resolution 512] [--seed 0] [--batch_size 32] [--clip_skip 0]

Prints each candidate caption's image count and accuracy, then the overall accuracy. Exit code 2, with a
one-line error, for a missing model or data folder, or fewer than two candidate captions.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="diffusers folder or .safetensors/.ckpt file")
    parser.add_argument("--data_root", required=True, help="held-out images with captions, laid out as for training")
    parser.add_argument("--captions", nargs="+", help="candidate captions (default: the distinct captions of the "
                                                      "images)")
    parser.add_argument("--trials", type=int, default=32, help="(timestep, noise) pairs per image")
    parser.add_argument("--resolution", type=int, default=512, help="the resolution the model was trained at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=32, help="UNet evaluations per batch")
    parser.add_argument("--clip_skip", type=int, default=0, help="as the model was trained with")
    return parser.parse_args(argv)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.exists(args.model):
        return fail(f"--model {args.model}: no such file or folder; give a diffusers model folder or a "
                    ".safetensors / .ckpt file")
    if not os.path.exists(args.data_root):
        return fail(f"--data_root {args.data_root}: no such folder; give the folder of held-out images, each with "
                    "its caption in a .txt file of the same name")
    if min(args.trials, args.batch_size, args.resolution) < 1:
        return fail("--trials, --batch_size and --resolution must be at least 1")
    # Imported after the checks above: torch and diffusers take seconds to import.
    import torch

    from utils.model import models
    from utils.watch import diffusion_classifier as classifier

    try:
        held_out = classifier.read_held_out(args.data_root, args.resolution, args.captions)
        model = models.load(args.model)
    except (classifier.EvaluationError, models.ModelLoadError) as e:
        return fail(str(e))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{len(held_out.records)} images x {len(held_out.candidates)} captions x {args.trials} trials on {device}: "
          f"{model.describe()}")
    report = classifier.score(model, held_out, args.trials, args.seed, args.batch_size, device, args.clip_skip)
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
