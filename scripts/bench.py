"""Benchmarks: `python scripts/bench.py <subcommand> [options]`; results are recorded in doc/PERFORMANCE.md.

Subcommands (each registered in `SUBCOMMANDS` with its help, its arguments and the function that runs it):
  data   the data pipeline on CPU: scan speed on a generated folder of N small captioned images, then
         images/s of the DataLoader alone (decode, crop, resize, flip, tokenize) at 0/1/2 workers.
  train  whole training steps (train.py's own setup and `utils.objective.step.training_step`, real DataLoader on
         generated JPEGs) of a real-size SD1.5 or SD2.1-768 with random weights, for each recipe in
         RECIPES: images/s, a per-phase breakdown, peak memory and MFU. Made for a GPU; on CPU it runs
         the tiny demo model (`--model tiny`) as a check that everything works. Started by
         `accelerate launch` or `torchrun`, it trains data-parallel as train.py does (each process
         `batch_size` images of every global batch): images/s of all processes together and the peak
         memory of each.
  optimizer  one optimizer step of the real-size UNet and text encoder for each of OPTIMIZER_VARIANTS (plain,
         bf16 weights, 8-bit states, stepped as the backward pass would): host time to queue it, time until the
         device is done, and how many tensors it updated; --profile adds torch.profiler's busiest operations.

Generated datasets are cached under --cache (default /tmp/sdtrainer-bench) so a rerun only measures.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import time
import traceback
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Aspect ratios of generated images: every one lands in a different bucket at 512.
SMALL_SIZES = [(96, 96), (128, 96), (96, 128), (160, 96), (96, 160), (192, 80)]
FOLDER_SIZE = 1000  # images per generated subfolder, as large datasets are usually split
GENERATOR_VERSION = 1  # bump when the generated data changes, so stale caches are not reused


def _write_images(job: tuple[str, int, int, tuple[int, int] | None, int]) -> None:
    """Writes images [start, stop) of one folder: noisy gradients (JPEG-compress like photos), each with a
    caption .txt and, every tenth, a yaml sidecar instead."""
    import numpy as np
    from PIL import Image

    folder, start, stop, size, quality = job
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        w, h = size or SMALL_SIZES[i % len(SMALL_SIZES)]
        gradient = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
        pixels = np.clip(gradient + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        stem = os.path.join(folder, f"img_{i:06d}")
        Image.fromarray(pixels).save(stem + ".jpg", quality=quality)
        if i % 10:
            Path(stem + ".txt").write_text(f"image {i}, gradient, noise, tag{i % 37}")
        else:
            Path(stem + ".yaml").write_text(f"main_prompt: image {i}\ntags:\n  - tag: gradient\n    weight: 1.5\n"
                                            f"  - noise\nmultiply: 1\n")


def generated_dataset(cache: Path, count: int, size: tuple[int, int] | None, quality: int, name: str) -> Path:
    """A folder of `count` captioned JPEGs in subfolders of FOLDER_SIZE, plus a global.yaml and a
    multiply.txt as real datasets have; generated once (in parallel processes) and reused."""
    root = cache / f"{name}-{count}-v{GENERATOR_VERSION}"
    done = root / ".complete"
    if done.exists():
        return root
    print(f"generating {count} images in {root} (cached for later runs) ...", flush=True)
    started = time.perf_counter()
    jobs = [(str(root / f"part{start // FOLDER_SIZE:04d}"), start, min(start + FOLDER_SIZE, count), size, quality)
            for start in range(0, count, FOLDER_SIZE)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write_images, jobs))
    (root / "global.yaml").write_text("tags:\n  - generated\n")
    (root / "part0000" / "multiply.txt").write_text("1.0\n")
    done.write_text("")
    print(f"  generated in {time.perf_counter() - started:.0f} s", flush=True)
    return root


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (scan and DataLoader worker processes are joined
    before we read it). Reported beside wall time: on a shared machine wall time also counts the waiting."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _timed(fn):
    started, cpu = time.perf_counter(), _cpu_seconds()
    result = fn()
    return result, time.perf_counter() - started, _cpu_seconds() - cpu


def _loader_rate(records, batch_size: int, workers: int, tokenizer) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the DataLoader alone over one epoch of `records`, worker start-up
    included (a new loader starts its workers every epoch)."""
    import data

    plan = data.build_epoch_batches(records, batch_size, seed=1, epoch=0)
    loader = data.make_epoch_loader(plan, records, tokenizer, cond_dropout=0.04, seed=1, epoch=0,
                                    num_workers=workers, flip_p=0.5, shuffle_tags=True)
    images, wall, cpu = _timed(lambda: sum(batch["pixel_values"].shape[0] for batch in loader))
    return images / wall, 1000 * cpu / images


def cmd_data(args) -> dict:
    import data
    from utils.model.shipped import load_tokenizer

    cache = Path(args.cache)
    root = generated_dataset(cache, args.images, None, 85, "small")
    load_before = os.getloadavg()[0]
    result, scan_s, scan_cpu = _timed(lambda: data.scan(str(root)))
    assert len(result.records) == args.images, (len(result.records), result.summary_lines()[:5])
    records, bucket_s, _ = _timed(lambda: data.assign_buckets(result.records, args.resolution))
    _, plan_s, _ = _timed(lambda: data.build_epoch_batches(records, args.batch_size, seed=1, epoch=0))
    out = {
        "images": args.images,
        "load_average_before_scan": round(load_before, 2),
        "scan_s": round(scan_s, 2), "scan_cpu_s": round(scan_cpu, 2), "scan_images_per_s": round(args.images / scan_s),
        "assign_buckets_s": round(bucket_s, 2), "build_epoch_batches_s": round(plan_s, 2),
    }
    print(f"scan: {args.images} images in {scan_s:.1f} s wall, {scan_cpu:.1f} s CPU ({args.images / scan_s:.0f} "
          f"images/s; load average before: {load_before:.1f}); assign_buckets {bucket_s:.2f} s; "
          f"build_epoch_batches {plan_s:.2f} s", flush=True)

    tokenizer = load_tokenizer("sd1")
    photo_w, photo_h = (int(v) for v in args.loader_size.split("x"))
    photos = generated_dataset(cache, args.loader_images, (photo_w, photo_h), 90, f"photo{photo_w}x{photo_h}")
    loader_sets = {
        f"{args.loader_images} photos {photo_w}x{photo_h} -> {args.resolution} buckets":
            data.assign_buckets(data.scan(str(photos)).records, args.resolution),
        f"{args.loader_images} small images (upscaled) -> {args.resolution} buckets": records[:args.loader_images],
    }
    out["loader"] = {}
    for label, subset in loader_sets.items():
        for workers in args.workers:
            rate, cpu_ms = _loader_rate(subset, args.batch_size, workers, tokenizer)
            out["loader"][f"{label}, workers={workers}"] = {"images_per_s": round(rate, 1),
                                                            "cpu_ms_per_image": round(cpu_ms, 1),
                                                            "load_average": round(os.getloadavg()[0], 2)}
            print(f"loader: {label}, batch {args.batch_size}, workers={workers}: {rate:.1f} images/s, "
                  f"{cpu_ms:.1f} CPU ms per image", flush=True)
    return out


def data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=100_000, help="small images generated for the scan")
    p.add_argument("--loader-images", type=int, default=512, help="images per DataLoader measurement")
    p.add_argument("--loader-size", default="1536x1024", help="size of the photo-like images the loader decodes")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cache", default="/tmp/sdtrainer-bench", help="where generated datasets are kept")


def train_ddp_options() -> tuple[tuple[str, object], ...]:
    from utils.run.setup import DDP_OPTIONS

    return tuple(DDP_OPTIONS.items())


@dataclass(frozen=True)
class Recipe:
    about: str
    flags: tuple[str, ...] = ()      # train.py command-line flags over the config file, as a user would give them
    config: str = "cfgs/train.json"
    optimizer: str | None = None     # replaces the optimizer of optimizer.json (UNet and text encoder)
    precision: str | None = None     # "fp16": fp16 autocast and a grad scaler instead of make_accelerator's choice
    ddp: tuple[tuple[str, object], ...] | None = None  # DistributedDataParallel's settings instead of train.py's
    planned: bool = False            # the memory plan picks the means for the card (vram auto or --vram-cap)
    compile_blocks: bool = False     # regional compile: diffusers' compile_repeated_blocks (transformer blocks)
    fp32_norms: bool = False         # the UNet's norms as torch's autocast runs them (fp32), not utils/model/norms.py
    # The optimizer's own step over all the weights (for bitsandbytes: a GPU wait per tensor), as EveryDream2 steps
    # it, not train.py's buckets.
    stock_optimizer_step: bool = False


RECIPES = {
    "reference": Recipe("EveryDream2's defaults: fp32 weights, fp16 autocast + grad scaler, VAE every step, "
                        "gradient checkpointing, AdamW8bit, batch 8",
                        ("--batch_size", "8", "--no-cache_latents", "--gradient_checkpointing", "--no-channels_last",
                         "--no-compile", "--attn_type", "sdp"), optimizer="adamw8bit", precision="fp16",
                        stock_optimizer_step=True),
    "auto": Recipe("cfgs/train.json as shipped, with the memory plan for the card (or --vram-cap): at the largest "
                   "batch up to --batch (default 8) that the plan fits", planned=True),
    "default": Recipe("cfgs/train.json as shipped"),
    "lowvram": Recipe("cfgs/lowvram.json as shipped (its memory means set, the plan adds VAE slicing)",
                      config="cfgs/lowvram.json", planned=True),
    "fastest": Recipe("default + compile, fused AdamW, batch 16", ("--compile", "--batch_size", "16"),
                      optimizer="adamw"),
    "default_vae": Recipe("default, but no latent cache: the VAE encodes every image every step",
                          ("--no-cache_latents",)),
    "default_8bit": Recipe("default, but AdamW8bit instead of fused AdamW", optimizer="adamw8bit"),
    "default_8bit_stock": Recipe("default_8bit, stepped by bitsandbytes' own step instead of train.py's buckets",
                                 optimizer="adamw8bit", stock_optimizer_step=True),
    "default_ckpt": Recipe("default + gradient checkpointing", ("--gradient_checkpointing",)),
    "default_nchw": Recipe("default, but UNet weights NCHW instead of channels-last", ("--no-channels_last",)),
    "default_fp16": Recipe("default, but fp16 autocast + grad scaler instead of bf16", precision="fp16"),
    "default_fp32_norms": Recipe("default, but the UNet's GroupNorm and LayerNorm in fp32 as torch's autocast runs "
                                 "them (before utils/model/norms.py)", fp32_norms=True),
    "compiled": Recipe("default + compile", ("--compile",)),
    "compiled_blocks": Recipe("default + the UNet's transformer blocks compiled (diffusers' "
                              "compile_repeated_blocks), not the whole UNet", compile_blocks=True),
    # The memory means one at a time (doc/MEMORY.md), against default.
    "default_fused": Recipe("default + fused_backward (the optimizer step inside the backward pass)",
                            ("--fused_backward",)),
    "default_bf16": Recipe("default + bf16_weights (bf16 weights, stochastic rounding)", ("--bf16_weights",)),
    "default_fused_8bit": Recipe("default + fused_backward + AdamW8bit", ("--fused_backward",), optimizer="adamw8bit"),
    "default_fused_bf16": Recipe("default + fused_backward + bf16_weights", ("--fused_backward", "--bf16_weights")),
    "default_8bit_bf16": Recipe("default + AdamW8bit + bf16_weights", ("--bf16_weights",), optimizer="adamw8bit"),
    "default_fused_8bit_bf16": Recipe("default + fused_backward + AdamW8bit + bf16_weights (no checkpointing)",
                                      ("--fused_backward", "--bf16_weights"), optimizer="adamw8bit"),
    "default_partial": Recipe("default + partial_checkpointing", ("--partial_checkpointing",)),
    "default_partial_bf16": Recipe("default + partial_checkpointing + bf16_weights",
                                   ("--partial_checkpointing", "--bf16_weights")),
    "default_partial_fused_bf16": Recipe("default + partial_checkpointing + fused_backward + bf16_weights",
                                         ("--partial_checkpointing", "--fused_backward", "--bf16_weights")),
    "default_partial_8bit_bf16": Recipe("default + partial_checkpointing + AdamW8bit + bf16_weights",
                                        ("--partial_checkpointing", "--bf16_weights"), optimizer="adamw8bit"),
    "default_attention": Recipe("default + attention_checkpointing", ("--attention_checkpointing",)),
    "default_attention_bf16": Recipe("default + attention_checkpointing + bf16_weights",
                                     ("--attention_checkpointing", "--bf16_weights")),
    "default_attention_8bit_bf16": Recipe("default + attention_checkpointing + AdamW8bit + bf16_weights (the plan's "
                                          "choice for SD1.5 at 12 GiB)", ("--attention_checkpointing",
                                                                          "--bf16_weights"), optimizer="adamw8bit"),
    "default_ckpt_8bit_bf16": Recipe("default + gradient checkpointing + AdamW8bit + bf16_weights (the plan's choice "
                                     "for SD1.5 at 8 GiB)", ("--gradient_checkpointing", "--bf16_weights"),
                                     optimizer="adamw8bit"),
    "default_lean": Recipe("default with every memory means: fused_backward, AdamW8bit, gradient checkpointing, "
                           "bf16_weights", ("--fused_backward", "--bf16_weights", "--gradient_checkpointing"),
                           optimizer="adamw8bit"),
    # Several processes only: train.py's DistributedDataParallel settings against others.
    "default_ddp_stock": Recipe("default, with DistributedDataParallel's own defaults", ddp=()),
    "default_ddp_bucket100": Recipe("default, DDP all-reduce buckets of 100 MB instead of 25",
                                    ddp=(*train_ddp_options(), ("bucket_cap_mb", 100))),
    "default_ddp_bf16": Recipe("default, gradients averaged in bf16 (DDP's bf16 compression hook)",
                               ddp=(*train_ddp_options(), ("comm_hook", "bf16"))),
}
DEFAULT_RESOLUTION = {"sd15": 512, "sd2-v": 768, "tiny": 128}
SKIPPED_STEPS = 2  # at the start of the timed epoch: DataLoader workers starting and filling their queue


def build_model(kind: str):
    """The model on CPU in fp32: the tiny demo model, or a real-size architecture with random weights."""
    import torch

    from utils.model import models, shipped

    if kind == "tiny":
        return models.load(REPO / "demo" / "tiny-sd")
    import diffusers

    from scripts.make_random_sd import random_sd

    unet, vae, text_encoder = random_sd(kind, dtype=torch.float32)
    scheduler_folder = shipped.config_dir(kind) / "scheduler"
    scheduler_class = getattr(diffusers, diffusers.DDIMScheduler.load_config(scheduler_folder)["_class_name"])
    return models.StableDiffusion(unet, text_encoder, vae, shipped.load_tokenizer("sd1" if kind == "sd15" else "sd2"),
                                  scheduler_class.from_pretrained(scheduler_folder), f"random-weight {kind}")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: str) -> tuple[float, str]:
    """(FLOP/s, what was measured): the median of 20 timed square matrix products on random data."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times), f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')} matmul"


def flops_per_image(model, run_args, resolution: int, device: str) -> dict[str, float]:
    """Forward + backward FLOPs of the UNet and the text encoder for one image (torch's flop counter on one
    training step of batch 1 from given latents, so the VAE does not run; no gradient checkpointing, so
    nothing is counted twice)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from data import token_ids
    from utils.objective.step import StepSettings, compute_loss

    model = copy.deepcopy(model)
    for module in (model.unet, model.text_encoder, model.vae):
        module.to(device).train()
    side = resolution // 2 ** (len(model.vae.config.block_out_channels) - 1)
    batch = {"latent_params": torch.randn(1, 2 * model.vae.config.latent_channels, side, side, device=device),
             "latent_misses": {"slots": torch.zeros(0, dtype=torch.long), "entries": []},
             "input_ids": token_ids(model.tokenizer, ["a photo of a cat"]),
             "loss_scale": torch.ones(1), "runt_size": 0}
    settings = StepSettings.from_args(run_args)
    settings.batch_size = 1
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        compute_loss(model.unet, model.text_encoder, model.vae, model.noise_scheduler("ddpm"), batch,
                     settings).backward()
    counts = counter.get_flop_counts()
    per_module = {part: sum(counts.get(type(module).__name__, {}).values())
                  for part, module in (("unet", model.unet), ("text_encoder", model.text_encoder))}
    return {"total": counter.get_total_flops(), **per_module}


class PhaseClock:
    """Times each step's phases as the device runs them: CUDA events recorded between phases (nothing waits),
    or the host clock on CPU, where every operation runs when it is called. `idle` is the device's time
    between one step's end and the next one's start (waiting for data or for the host)."""

    def __init__(self, device: str):
        self.device = device
        self.steps: list[list[tuple[str, object]]] = []
        self.origin = self._now()

    def _now(self):
        import torch

        if self.device != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start_step(self) -> None:
        self.steps.append([("start", self._now())])

    def mark(self, phase: str) -> None:
        self.steps[-1].append((phase, self._now()))

    def ms_per_step(self) -> dict[str, float]:
        _sync(self.device)

        def ms(a, b) -> float:
            return a.elapsed_time(b) if self.device == "cuda" else 1000 * (b - a)

        totals, previous = defaultdict(float), self.origin
        for marks in self.steps:
            totals["idle"] += ms(previous, marks[0][1])
            for (_, earlier), (phase, later) in zip(marks, marks[1:]):
                totals[phase] += ms(earlier, later)
            previous = marks[-1][1]
        return {phase: total / len(self.steps) for phase, total in totals.items()}


def _optimizer_variant(base: Path, optimizer: str, out: Path) -> Path:
    settings = json.loads(base.read_text())
    settings.setdefault("base", {})["optimizer"] = optimizer
    settings.setdefault("text_encoder_overrides", {})["optimizer"] = None
    path = out / f"optimizer_{optimizer}.json"
    path.write_text(json.dumps(settings, indent=2))
    return path


def recipe_args(recipe: Recipe, dataset: Path, resolution: int, cache: Path, extra: list[str],
                vram_cap: float | None = None):
    """The recipe's options, parsed and checked by train.py's own option code."""
    from utils.options import config

    argv = ["--config", str(REPO / recipe.config), "--data_root", str(dataset), "--resolution", str(resolution),
            # The bench builds the model itself; any existing model satisfies the option check.
            "--resume_ckpt", str(REPO / "demo" / "tiny-sd"),
            "--logdir", str(cache / "logs"), "--latent_cache_dir", str(cache / "latent_cache"),
            "--vram", "off" if not recipe.planned else "auto" if vram_cap is None else str(vram_cap), *recipe.flags,
            *extra]
    run_args = config.load(argv)
    optimizer_config = Path(run_args.optimizer_config)
    run_args.optimizer_config = str(optimizer_config if optimizer_config.is_absolute() else REPO / optimizer_config)
    run_args.sample_prompts = str(REPO / run_args.sample_prompts)
    if recipe.optimizer:
        run_args.optimizer_config = str(_optimizer_variant(Path(run_args.optimizer_config), recipe.optimizer, cache))
    return run_args


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def plan_recipe(recipe: Recipe, run_args, size, records, device: str, largest_batch: int):
    """(memory plan or None, estimate) for the recipe's options. A planned recipe on a GPU takes the largest batch
    up to `largest_batch` and its config's batch that its plan fits (run_args.batch_size is set to it); the others
    get the estimate of their own means."""
    import torch

    from optimizer.optimizers import read_optimizer_file
    from utils.options.config import ConfigError
    from utils.run import memory
    from utils.watch.sampling import SampleSettings

    def work():
        return memory.workload(run_args, read_optimizer_file(run_args.optimizer_config), records,
                               SampleSettings.defaults_from(run_args), run_args.batch_size)

    if not recipe.planned or device != "cuda":
        means = memory.Means(**{name: bool(getattr(run_args, name)) for name in memory.SLOWDOWN},
                             compensated_rounding=run_args.bf16_rounding == "compensated")
        return None, memory.estimate(size, means, work())
    largest_batch = min(largest_batch, run_args.batch_size)
    for batch in sorted({b for b in (largest_batch, 8, 4, 2, 1) if b <= largest_batch}, reverse=True):
        run_args.batch_size = batch
        try:
            plan = memory.plan_run(run_args, size, work(), torch.device("cuda"))
            return plan, plan.estimate
        except ConfigError as e:
            problem = e
    raise problem


def run_recipe(recipe: Recipe, master, records, run_args, device: str, opts, estimate=None) -> dict:
    """Sets the model up as train.py does, fills the latent cache or warms up, then times `opts.steps` steps of
    the next epoch; then a sample pass and a validation-like pass (no gradients), for the whole run's peak memory."""
    import torch

    from data.latent_cache import LatentCache
    from optimizer.optimizers import make_lr_schedule, make_optimizer, read_optimizer_file, resolve_settings
    from utils.model.norms import Bf16GroupNorm, Bf16LayerNorm
    from utils.objective.prediction import predict
    from utils.objective.step import StepSettings, encode_images, encode_text, training_step
    from utils.run import memory
    from utils.run.build import make_optimizers
    from utils.run.epoch_data import EpochData
    from utils.run.setup import DDP_OPTIONS, dataloader_workers, make_accelerator, prepare_models

    _reset_accelerate()
    ddp_options = DDP_OPTIONS if recipe.ddp is None else dict(recipe.ddp)
    accelerator = make_accelerator(run_args, ddp_options)
    notes = []
    if recipe.precision and accelerator.mixed_precision != recipe.precision:
        if device == "cuda":
            from accelerate import Accelerator, DistributedDataParallelKwargs

            _reset_accelerate()
            accelerator = Accelerator(mixed_precision=recipe.precision,
                                      kwargs_handlers=[DistributedDataParallelKwargs(**ddp_options)])
        else:
            notes.append(f"{recipe.precision} needs a GPU: ran in {accelerator.mixed_precision}")
    torch.manual_seed(run_args.seed)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    peaks = {}

    def peak(phase: str) -> None:
        """The phase's peak allocated memory (reserved memory stays at its high-water mark, so only the whole run's
        peak reserved is meaningful)."""
        if device == "cuda":
            _sync(device)
            peaks[phase] = torch.cuda.max_memory_allocated() / 2 ** 30
            peaks["reserved"] = max(peaks.get("reserved", 0.0), torch.cuda.max_memory_reserved() / 2 ** 30)
            torch.cuda.reset_peak_memory_stats()

    model = copy.deepcopy(master)
    trained = prepare_models(model, run_args, accelerator)
    if recipe.compile_blocks:
        model.unet.compile_repeated_blocks()
    if recipe.fp32_norms:
        torch_norms = {Bf16GroupNorm: torch.nn.GroupNorm, Bf16LayerNorm: torch.nn.LayerNorm}
        for module in model.unet.modules():
            module.__class__ = torch_norms.get(type(module), type(module))
    latent_cache = LatentCache(run_args.latent_cache_dir, model.vae) if run_args.cache_latents else None
    # As train.py: each step's global batch is planned as one and every process trains its share of it.
    epoch_data = EpochData(records, None, model.tokenizer, run_args, accelerator, dataloader_workers(accelerator),
                           latent_cache=latent_cache)
    batch_size, processes, global_batch = run_args.batch_size, accelerator.num_processes, epoch_data.global_batch

    def epoch_loader(epoch: int):
        return epoch_data.loader(epoch_data.plan(epoch, run_args.grad_accum), epoch)

    steps_per_epoch = len(records) // global_batch
    settings = resolve_settings(read_optimizer_file(run_args.optimizer_config), run_args, steps_per_epoch, processes)
    optimizers = make_optimizers(trained, settings, run_args, accelerator)
    if recipe.stock_optimizer_step:
        for name, module in trained.items():
            stock = make_optimizer([p for p in module.parameters() if p.requires_grad], settings[name])
            optimizers.optimizers[name], optimizers.schedules[name] = stock, make_lr_schedule(stock, settings[name])
    for name, module in trained.items():
        setattr(model, name, accelerator.prepare(module))
    noise_scheduler = model.noise_scheduler(run_args.train_sampler)
    step_settings = StepSettings.from_args(run_args)

    def step(batch, mark=lambda phase: None):
        return training_step(model, noise_scheduler, batch, step_settings, accelerator, optimizers, window=1,
                             update=True, clip_grad_norm=run_args.clip_grad_norm, mark=mark)[0]

    peak("model set-up")
    # Warm-up: a whole epoch while the latent cache still lacks images (filling it, timed), else a few steps.
    # Every process must take the same number of steps: they look at the cache only once all of them got here.
    accelerator.wait_for_everyone()
    fills_cache = latent_cache is not None and len(latent_cache) < len(records)
    loader = epoch_loader(0)
    warmup_steps = len(loader) if fills_cache else min(opts.warmup, len(loader))
    started, first_step_s = time.perf_counter(), None
    for _, batch in zip(range(warmup_steps), loader):
        step(batch)
        if first_step_s is None:
            _sync(device)
            first_step_s = time.perf_counter() - started
    _sync(device)
    warmup_s = time.perf_counter() - started
    del loader
    peak("latent cache filling" if fills_cache else "warm-up steps")

    loader = epoch_loader(1)
    wanted = max(opts.steps, math.ceil(opts.min_images / batch_size))
    steps = min(wanted, len(loader) - SKIPPED_STEPS)
    if steps < 1:
        raise ValueError(f"{len(records)} images make {len(loader)} steps of {global_batch} images per epoch, too few "
                         f"to time after {SKIPPED_STEPS} start-up steps: give more --images")
    if steps < wanted:  # a rate from a step or two is the least steady (doc/PERFORMANCE.md, runs N and O)
        notes.append(f"timed {steps} of the {wanted} steps asked: {len(records)} images make {len(loader)} steps of "
                     f"{global_batch} per epoch; give more --images for a steadier rate")
        if accelerator.is_main_process:
            print(f"  note: {notes[-1]}", flush=True)
    batches = iter(loader)
    for _ in range(SKIPPED_STEPS):
        step(next(batches))
    _sync(device)
    clock, data_wait = PhaseClock(device), 0.0
    started = time.perf_counter()
    for _ in range(steps):
        fetch = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - fetch
        clock.start_step()
        loss = step(batch, clock.mark)
    _sync(device)
    wall = time.perf_counter() - started
    del batches, loader
    peak("training steps")
    sample_pass_s = None
    if opts.samples and accelerator.is_main_process:
        started = time.perf_counter()
        _sample_pass(model, accelerator, run_args, batch["captions"], opts)
        sample_pass_s = time.perf_counter() - started
        peak("samples")
    with torch.no_grad(), accelerator.autocast():  # what a validation pass computes: pixels encoded, a prediction
        width, height = records[0].bucket
        latents = encode_images(model.vae, torch.rand(batch_size, 3, height, width, device=accelerator.device) * 2 - 1)
        hidden = encode_text(model.text_encoder, batch["input_ids"], run_args.clip_skip)
        predict(model.unet, latents, torch.full((batch_size,), 500, device=accelerator.device), hidden)
        del latents, hidden
    peak("validation")
    result = {
        "about": recipe.about, "batch_size": batch_size, "processes": processes, "global_batch": global_batch,
        "precision": accelerator.mixed_precision,
        "means": {name: bool(getattr(run_args, name)) for name in memory.SLOWDOWN},
        "bf16_rounding": run_args.bf16_rounding,
        "optimizers": {name: s.optimizer for name, s in settings.items() if name in trained},
        "images_per_s": steps * global_batch / wall, "step_ms": 1000 * wall / steps,
        "data_wait_ms": 1000 * data_wait / steps, "phases_ms": clock.ms_per_step(), "timed_steps": steps,
        "first_step_s": first_step_s, "warmup_steps": warmup_steps, "warmup_s": warmup_s,
        "sample_pass_s": sample_pass_s,
        "last_loss": float(loss), "notes": notes,
    }
    if fills_cache and warmup_steps > 1:  # the first step's one-off set-up costs are reported on their own
        result["cache_build_images_per_s"] = (warmup_steps - 1) * global_batch / (warmup_s - first_step_s)
    if device == "cuda":
        whole = torch.tensor([[peaks.pop("reserved")]], device=accelerator.device)
        per_process = accelerator.gather(whole).cpu()[:, 0]
        result["peak_reserved_gib"] = float(per_process.max())
        result["peak_reserved_gib_per_process"] = [round(float(v), 2) for v in per_process]
        result["peak_allocated_gib_by_phase"] = {phase: round(v, 3) for phase, v in peaks.items()}
    if estimate is not None:
        result["estimate_gib"] = estimate.peak / 2 ** 30
        result["estimate_moment"] = estimate.moment
        result["estimate_parts_gib"] = {name: round(b / 2 ** 30, 3) for name, b in estimate.parts.items()}
    return result


def _sample_pass(model, accelerator, run_args, captions, opts) -> None:
    """One sample event as train.py renders it (the sample file's prompts, cfgs and sizes), with few steps: memory
    does not depend on their number."""
    import dataclasses

    from torch.utils.tensorboard import SummaryWriter

    from utils.watch.sampling import SampleSchedule, generate_samples

    schedule = SampleSchedule.from_args(run_args)
    event = schedule.prepare(0, captions)
    event = dataclasses.replace(event, settings=dataclasses.replace(event.settings,
                                                                    num_inference_steps=opts.sample_steps))
    out = Path(opts.cache) / "samples"
    with SummaryWriter(str(out / "tb")) as writer:
        generate_samples(model, accelerator.unwrap_model(model.unet), accelerator.unwrap_model(model.text_encoder),
                         event, step=0, out_dir=out, tb_writer=writer, autocast=accelerator.autocast,
                         clip_skip=run_args.clip_skip)


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


PHASES = ("vae", "text_encoder", "unet", "backward", "optimizer", "idle")


def _table(header: list[str], results: dict, row) -> list[str]:
    """A markdown table of `header`'s columns: one row per recipe from `row(name, result)`, or its error."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r.get('batch_size', '')} | {r['error']} |" + " |" * (len(header) - 3))
        else:
            lines.append(row(name, r))
    return lines


def _reference_rate(results: dict, name: str) -> float | None:
    """images/s of the reference recipe run under the same --vram-cap as `name` ("auto@8GiB": "reference@8GiB")."""
    cap = name.partition("@")[2]
    return results.get(f"reference@{cap}" if cap else "reference", {}).get("images_per_s")


def train_table(results: dict) -> list[str]:
    header = ["recipe", "batch", "images/s", "x reference", "MFU", "step ms", "data wait", "VAE", "TE fwd",
              "UNet fwd+loss", "backward (UNet+TE)", "optimizer", "GPU idle", "peak reserved GiB", "first step s",
              "sample pass s"]

    def row(name: str, r: dict) -> str:
        reference = _reference_rate(results, name)
        ratio = f"{r['images_per_s'] / reference:.2f}" if reference else "-"
        phases = " | ".join(f"{r['phases_ms'].get(p, 0):.1f}" for p in PHASES)
        reserved = " / ".join(f"{v:.2f}" for v in r.get("peak_reserved_gib_per_process", [])) or "-"
        batch = f"{r['processes']} x {r['batch_size']}" if r["processes"] > 1 else r["batch_size"]
        return (f"| {name} | {batch} | {r['images_per_s']:.1f} | {ratio} | {100 * r['mfu']:.1f}% | "
                f"{r['step_ms']:.1f} | {r['data_wait_ms']:.1f} | {phases} | {reserved} | {r['first_step_s']:.1f} | "
                f"{r['sample_pass_s'] or 0:.1f} |")

    return _table(header, results, row)


def memory_table(results: dict) -> list[str]:
    """Each recipe's means, its measured peak by phase and the memory plan's estimate of the whole run's peak."""
    header = ["recipe", "batch", "means on", "optimizer (UNet)", "images/s",
              "peak allocated GiB: cache filling / steps / samples / validation", "peak reserved GiB", "estimate GiB",
              "estimate error"]

    def row(name: str, r: dict) -> str:
        means = ", ".join(m for m, on in r["means"].items() if on) or "none"
        if r["means"].get("bf16_weights") and r.get("bf16_rounding") == "compensated":
            means = means.replace("bf16_weights", "bf16_weights (compensated)")
        phases = r.get("peak_allocated_gib_by_phase", {})
        by_phase = " / ".join(f"{phases[p]:.2f}" if p in phases else "-"
                              for p in ("latent cache filling", "training steps", "samples", "validation"))
        measured, estimated = r.get("peak_reserved_gib"), r.get("estimate_gib")
        error = f"{100 * (estimated / measured - 1):+.1f}%" if measured and estimated else "-"
        return (f"| {name} | {r['batch_size']} | {means} | {r['optimizers'].get('unet', '-')} | "
                f"{r['images_per_s']:.1f} | {by_phase} | {measured or 0:.2f} | {estimated or 0:.2f} | {error} |")

    return _table(header, results, row)


def cmd_train(args) -> dict:
    import torch

    import data
    from utils.run import memory

    from accelerate import PartialState

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # As train.py does, before CUDA starts (the setting is read once per process).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # Joins the launcher's other processes now (if any), so that one of them generates the data.
    processes = PartialState(cpu=device == "cpu")
    is_main = processes.is_main_process
    report = print if is_main else (lambda *_, **__: None)
    cache = Path(args.cache)
    resolution = args.resolution or DEFAULT_RESOLUTION[args.model]
    side = resolution * 3 // 2  # larger than the bucket, so crops and resizes happen as with photos
    with processes.local_main_process_first():
        dataset = generated_dataset(cache, args.images, (side, side), 90, f"square{side}")
    records = data.assign_buckets(data.scan(str(dataset)).records, resolution)
    started = time.perf_counter()
    master = build_model(args.model)
    out = {"model": master.describe(), "resolution": resolution, "device": device,
           "gpu": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
           "versions": _versions(), "model_build_s": round(time.perf_counter() - started, 1)}
    rate, rate_what = matmul_rate(device)
    flops = flops_per_image(master, recipe_args(RECIPES["default"], dataset, resolution, cache, []), resolution,
                            device)
    _free(device)
    out.update(matmul_flops_per_s=rate, matmul=rate_what, flops_per_image=flops, recipes={})
    report(f"{out['model']} at {resolution} px on {out['gpu']}; {rate_what}: {rate / 1e12:.1f} TFLOP/s; UNet + text "
          f"encoder forward+backward: {flops['total'] / 1e12:.3f} TFLOP per image (UNet {flops['unet'] / 1e12:.3f}, "
          f"text encoder {flops['text_encoder'] / 1e12:.3f})", flush=True)
    size = memory.ModelSize.from_configs({"unet": dict(master.unet.config), "vae": dict(master.vae.config),
                                          "text_encoder": master.text_encoder.config.to_dict()})
    runs = [(name, cap) for cap in (args.vram_cap or [None]) for name in args.recipes]
    for name, cap in runs:
        recipe = RECIPES[name]
        if device == "cuda":
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, (cap or math.inf) * 2 ** 30 / total))
        report(f"{name}{f' under {cap:g} GiB' if cap else ''}: {recipe.about} ...", flush=True)
        run_args = recipe_args(recipe, dataset, resolution, cache, args.extra, cap)
        started, tried = time.perf_counter(), []
        while True:
            # Each recipe fills a latent cache of its own: the first epoch's peak is part of every run's.
            run_args.latent_cache_dir = str(cache / f"latent_cache_{name}")
            shutil.rmtree(run_args.latent_cache_dir, ignore_errors=True)
            try:
                plan, estimate = plan_recipe(recipe, run_args, size, records, device, args.batch)
                result = run_recipe(recipe, master, records, run_args, device, args, estimate)
                result["mfu"] = flops["total"] * result["images_per_s"] / (rate * result["processes"])
                if plan:
                    result["plan"] = plan.lines()
            except torch.cuda.OutOfMemoryError as e:
                result = {"batch_size": run_args.batch_size, "error": "out of memory", "detail": str(e)[:300]}
            except Exception as e:  # noqa: BLE001 - one recipe failing (e.g. compile on an unusual setup) is a result
                traceback.print_exc()
                result = {"batch_size": run_args.batch_size, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            _free(device)
            shutil.rmtree(run_args.latent_cache_dir, ignore_errors=True)
            if result.get("error") != "out of memory" or not args.fit_batch or run_args.batch_size == 1:
                break
            tried.append(run_args.batch_size)  # --fit-batch: the same recipe at half the batch
            run_args.batch_size //= 2
        if tried:
            result["out_of_memory_at_batch"] = tried
        result["recipe_s"] = time.perf_counter() - started
        if cap:
            result["vram_cap_gib"] = cap
        key = f"{name}@{cap:g}GiB" if cap else name
        runs_before = sum(k == key or k.startswith(key + " (") for k in out["recipes"])  # a recipe given twice: A B A B
        out["recipes"][f"{key} ({runs_before + 1})" if runs_before else key] = result
        report(f"{name}: {json.dumps(result)}", flush=True)
        if args.json and is_main:  # so far, in case the run is cut short; main() writes the whole report at the end
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    report("\n".join(train_table(out["recipes"])), flush=True)
    report("\n".join(memory_table(out["recipes"])), flush=True)
    if processes.num_processes > 1:
        processes.destroy_process_group()
    return out if is_main else None


# name -> (optimizer, bf16 weights, stepped as the backward pass's hooks step it (fused_backward))
OPTIMIZER_VARIANTS = {
    "adamw": ("adamw", False, False),
    "adamw_bf16": ("adamw", True, False),
    "adamw_bf16_fused": ("adamw", True, True),
    "adamw8bit": ("adamw8bit", False, False),
    "adamw8bit_fused": ("adamw8bit", False, True),
    "adamw8bit_bf16": ("adamw8bit", True, False),
    "adamw8bit_bf16_fused": ("adamw8bit", True, True),
}


def cmd_optimizer(args) -> dict:
    """One optimizer step of the UNet and text encoder as train.py sets them up (UNet channels-last, random
    gradients): the host's time to queue it, the time until the device has done it, whether every tensor moved,
    and with --profile torch.profiler's busiest operations (host and device)."""
    import torch

    from optimizer.optimizers import OptimizerSettings, TrainingOptimizers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    master = build_model(args.model)
    rows = {}
    for name in args.variants:
        optimizer, bf16, fused = OPTIMIZER_VARIANTS[name]
        models = {part: copy.deepcopy(getattr(master, part)).to(device, dtype=torch.bfloat16 if bf16 else None)
                  for part in ("unet", "text_encoder")}
        models["unet"].to(memory_format=torch.channels_last)
        # lr large enough that every bf16 weight moves at every step (the time does not depend on it)
        settings = OptimizerSettings(optimizer, 1e-2, "constant", 0, 1, (0.9, 0.999), 1e-8, 0.01)
        rounding = torch.Generator(device).manual_seed(0) if bf16 else None
        optimizers = TrainingOptimizers(models, {part: settings for part in models}, fused, rounding)
        params = {part: [p for p in m.parameters() if p.requires_grad] for part, m in models.items()}
        for _ in range(2):
            _optimizer_step(optimizers, params, fused, device)
        before = [p.detach().clone() for part_params in params.values() for p in part_params]
        times = [_optimizer_step(optimizers, params, fused, device) for _ in range(args.steps)]
        after = [p for part_params in params.values() for p in part_params]
        rows[name] = {"optimizer": optimizer, "weights": "bf16" if bf16 else "fp32", "fused_backward": fused,
                      "tensors": len(after), "tensors_updated": sum(not torch.equal(a, b) for a, b in zip(before, after)),
                      "host_ms": 1000 * statistics.median(t[0] for t in times),
                      "done_ms": 1000 * statistics.median(t[1] for t in times)}
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
        if args.profile:
            activities = [torch.profiler.ProfilerActivity.CPU] + \
                ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
            with torch.profiler.profile(activities=activities) as profile:
                _optimizer_step(optimizers, params, fused, device)
            for key in ("self_cpu_time_total", "self_device_time_total")[:len(activities)]:
                print(profile.key_averages().table(sort_by=key, row_limit=10, max_name_column_width=60))
        del optimizers, models, params, before, after
        _free(device)
    header = ["variant", "optimizer", "weights", "fused_backward", "tensors updated", "host ms per step",
              "until done, ms"]
    print("\n".join(_table(header, rows, lambda n, r: f"| {n} | {r['optimizer']} | {r['weights']} | "
                                               f"{'on' if r['fused_backward'] else 'off'} | {r['tensors_updated']} of "
                                               f"{r['tensors']} | {r['host_ms']:.1f} | {r['done_ms']:.1f} |")))
    return {"model": args.model, "device": device, "variants": rows,
            **({"gpu": torch.cuda.get_device_name()} if device == "cuda" else {})}


def _optimizer_step(optimizers, params: dict, fused: bool, device: str) -> tuple[float, float]:
    """Random gradients, then one step: (seconds until the host has queued it, until the device has done it)."""
    import torch

    for part_params in params.values():
        for p in part_params:
            p.grad = torch.randn_like(p) * 1e-3
    _sync(device)
    started = time.perf_counter()
    for part, optimizer in optimizers.optimizers.items():
        if fused:  # as the gradient hooks hand them over, last layers first
            for p in reversed(params[part]):
                optimizer.ready(p)
        optimizer.step()
    queued = time.perf_counter() - started
    _sync(device)
    return queued, time.perf_counter() - started


def optimizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=sorted(DEFAULT_RESOLUTION), default="sd15",
                   help="sd15 / sd2-v: real-size architecture with random weights; tiny: the demo model")
    p.add_argument("--variants", nargs="+", choices=list(OPTIMIZER_VARIANTS), default=list(OPTIMIZER_VARIANTS))
    p.add_argument("--steps", type=int, default=8, help="timed steps of each variant (their median is reported)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's busiest operations of one step")


def _versions() -> dict:
    import importlib.metadata

    names = ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes")
    return {name: importlib.metadata.version(name) for name in names}


def train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=sorted(DEFAULT_RESOLUTION), default="sd15",
                   help="sd15 / sd2-v: real-size architecture with random weights; tiny: the demo model")
    p.add_argument("--resolution", type=int, help="default: 512 for sd15, 768 for sd2-v, 128 for tiny")
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--images", type=int, default=512, help="generated training images (JPEG, 1.5x the resolution)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps when the latent cache needs no filling")
    p.add_argument("--steps", type=int, default=25, help="timed steps (more for small batches, see --min-images)")
    p.add_argument("--min-images", type=int, default=64, help="timed steps cover at least this many images")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="train.py flags added to every recipe (e.g. --extra --batch_size 2), last")
    p.add_argument("--cache", default="/tmp/sdtrainer-bench", help="generated datasets and the latent cache")
    p.add_argument("--vram-cap", type=float, nargs="+", help="GiB: cap this process's GPU memory "
                   "(torch.cuda.set_per_process_memory_fraction) to stand in for a smaller card; planned recipes "
                   "(auto) plan for it. Several caps: every recipe under each, in turn")
    p.add_argument("--batch", type=int, default=8, help="the largest batch a planned recipe (auto) tries")
    p.add_argument("--fit-batch", action="store_true", help="a recipe that runs out of memory is run again at half "
                   "the batch, down to 1 (the reference's best batch under a --vram-cap)")
    p.add_argument("--no-samples", dest="samples", action="store_false",
                   help="skip the sample pass after the timed steps (on by default: its memory is part of a run's)")
    p.add_argument("--sample-steps", type=int, default=4, help="sampler steps of the sample pass")


# name -> (help, add its arguments, run it and return the results)
SUBCOMMANDS = {"data": ("scan and DataLoader speed on CPU", data_args, cmd_data),
               "train": ("training-step speed and memory of each recipe (GPU)", train_args, cmd_train),
               "optimizer": ("one optimizer step of each variant: host and device time, tensors updated",
                             optimizer_args, cmd_optimizer)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--json", help="also write the results to this JSON file")
        add_args(p)
    args = parser.parse_args(argv)

    measured = SUBCOMMANDS[args.command][2](args)
    if measured is None:  # not the first process of a launched run: that one reports for all
        return 0
    results = {"command": "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                          f"Python {platform.python_version()}",
               **measured}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
