"""The memory plan (doc/MEMORY.md): before the model is loaded, pick the fastest combination of memory means that fits
the GPU for the batch the user asked for, and estimate the run's peak.

The estimate adds what the parts of a run hold, from the model's parameter counts (read from its configs, on the
meta device) and the bytes each means keeps per parameter, plus activation memory per latent pixel measured on an
H200 for the SD UNets and per token for a trained text encoder (ACTIVATIONS; doc/PERFORMANCE.md has the runs). The
peak is the largest of three moments: a training step (the latent cache filling or not), a sample pass and a
validation pass.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields, replace

from optimizer.optimizers import EIGHT_BIT, ELEMENT_WISE, check_steps_per_parameter, optimizer_names
from optimizer.per_parameter import BUCKET_ELEMENTS
from utils.options.config import ConfigError

GiB = 2 ** 30
# Room kept free on top of the estimate: CUDA's own kernels and libraries outside PyTorch's allocator, and the
# estimate's error (measured within 10%, doc/PERFORMANCE.md).
SAFETY_MARGIN = 0.08
MIN_MARGIN_GIB = 0.5
# What the estimate may miss the measured peak by: compensated rounding, a cost the run can do without, is taken only
# where it fits with that much to spare as well, so that it never brings a run to the edge of the card.
ESTIMATE_ERROR = 0.10


@dataclass(frozen=True)
class Activations:
    """Bytes per latent pixel of one image, per channel of the UNet's first block (bf16 autocast), and per image
    pixel for the VAE; fitted to SD1.5 runs on H200s at 512 px (checkpointing's also at 768) in doc/PERFORMANCE.md.
    The text encoder's per token, per channel and per layer, counted on the SD configs (tests/test_memory.py)."""
    training: float          # what the UNet's forward keeps for the backward pass, no gradient checkpointing
    partial: float           # the same with partial_checkpointing (one checkpointed block recomputed included)
    attention: float         # the same with attention_checkpointing
    boundaries: float        # gradient checkpointing: the block inputs kept for the backward pass
    recompute: float         # gradient checkpointing: one block recomputed in the backward pass
    inference: float         # a forward without gradients (samples, validation)
    vae_encode: float        # per image pixel while the VAE encodes
    vae_decode: float        # per image pixel while the VAE decodes a sample
    fixed_gib: float         # what does not scale: cuBLAS / cuDNN workspaces, allocator slack
    text_encoder: float      # what a trained, unchecked text encoder's forward keeps, per token x width x layer


# boundaries and recompute come from full checkpointing measured at 512 and 768 px, with and without the gradients
# held (run M): where the gradients are held they outweigh the block inputs, so only runs without them (fused_backward)
# show the block inputs' size, and two resolutions show how it scales. training and partial were fitted to runs whose
# trained text encoder kept its activations (SD1.5 at batch 8: 26.5 bytes per UNet unit of them), now counted apart.
# The text encoder keeps 48 bytes per token x width x layer for SD1.5's (quick GELU), 40 for SD2's (GELU).
# attention: partial's, plus what the forward keeps of the top ResNet blocks, counted on the CPU for SD1.5's UNet
# (saved-tensor hooks, bf16 autocast, 512 px: 742 bytes unchecked, 390 partial, 470 attention-only).
ACTIVATIONS = Activations(training=720.0, partial=408.0, attention=486.0, boundaries=125.0, recompute=70.0,
                          inference=40.0, vae_encode=1960.0, vae_decode=2170.0, fixed_gib=0.6, text_encoder=49.0)


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts and the shapes the activations scale with."""
    unet: int
    text_encoder: int
    vae: int
    unet_channels: int          # the UNet's first block width (320 for SD 1.x / 2.x)
    vae_scale: int              # pixels per latent pixel along a side (8)
    text_length: int            # tokens per caption (77)
    text_encoder_width: int     # 768 for SD 1.x, 1024 for SD 2.x
    text_encoder_layers: int

    @classmethod
    def from_configs(cls, configs: dict[str, dict]) -> ModelSize:
        """Counts parameters by building the models on the meta device: no memory, no weights read."""
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(configs["unet"])
            vae = AutoencoderKL.from_config(configs["vae"])
            text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        text = text_encoder.config
        return cls(count(unet), count(text_encoder), count(vae), unet.config.block_out_channels[0],
                   2 ** (len(vae.config.block_out_channels) - 1), text.max_position_embeddings, text.hidden_size,
                   text.num_hidden_layers)


@dataclass(frozen=True)
class Means:
    """The memory means a plan turns on (doc/MEMORY.md); each trades speed, or bf16_weights precision, for memory."""
    fused_backward: bool = False
    eight_bit_states: bool = False
    gradient_checkpointing: bool = False
    bf16_weights: bool = False
    # The UNet's highest-resolution blocks and a trained text encoder's layers; gradient_checkpointing covers it.
    partial_checkpointing: bool = False
    # Their transformer blocks only, and the text encoder; partial or full checkpointing covers it.
    attention_checkpointing: bool = False
    # Not a memory means but a cost of memory: bf16 weights round to nearest and keep their rounding errors
    # (bf16_rounding), 2 bytes per trained parameter; the plan turns it on where it fits once the means are chosen.
    compensated_rounding: bool = False

    def describe(self) -> str:
        said = {f.name: "on" if getattr(self, f.name) else "off" for f in fields(self)}
        if self.bf16_weights:
            said["bf16_weights"] += f" ({'compensated' if self.compensated_rounding else 'stochastic'} rounding)"
        del said["compensated_rounding"]
        return ", ".join(f"{name} {state}" for name, state in said.items())


# How much slower each means makes a step at batch 8 (SD1.5, 512, H200; doc/PERFORMANCE.md runs F-L, R); the plan
# takes the fitting combination with the smallest product. attention_checkpointing ran at 0.99x and 1.21x
# partial_checkpointing's speed in turns (run R) and, with bf16 weights, slower than 8-bit states with bf16 weights:
# 1.10 ranks it between them. fused_backward measured as fast as the plain step; its
# 1.02 makes the plan take it only where it saves memory or hides bf16_weights' cost (it stops a run on a
# non-finite gradient, doc/MEMORY.md). 8-bit states and bf16 weights both step the weights through copies in flat
# buckets (optimizer.per_parameter): that copying is most of either's cost, so together they cost little more than
# bf16 weights alone (run L: 60 against 50 ms of optimizer per step; fused AdamW 17). Since run S, AdamW8bit on
# bf16 weights steps in one kernel on CUDA (optimizer.fused_8bit: 33.6 ms there, against 54.9); not refitted yet.
SLOWDOWN = {"fused_backward": 1.02, "eight_bit_states": 1.25, "gradient_checkpointing": 1.65,
            "bf16_weights": 1.15, "partial_checkpointing": 1.14, "attention_checkpointing": 1.10}
SLOWDOWN_WITH_BF16_WEIGHTS = {"eight_bit_states": 1.06}
# Inside the backward pass (fused_backward) an update's host work competes with queuing the backward's kernels: the
# host time of bf16_weights' copies and rounding is hidden there, bitsandbytes' calls are not (runs I, L).
# With checkpointing the host also reruns the checkpointed blocks' forward in the backward pass, and bf16_weights'
# host time adds to it (run K; 8-bit states there were not measured apart and are taken as without checkpointing).
SLOWDOWN_IN_FUSED_BACKWARD = {"eight_bit_states": 1.42, "bf16_weights": 1.0}
SLOWDOWN_IN_CHECKPOINTED_FUSED_BACKWARD = {"eight_bit_states": 1.42, "bf16_weights": 1.34}


def slowdown(means: Means) -> float:
    """The plan's estimate of how much slower than none of them these means make a step."""
    factors = {**SLOWDOWN, **(SLOWDOWN_WITH_BF16_WEIGHTS if means.bf16_weights else {})}
    if means.fused_backward:
        checkpointed = means.gradient_checkpointing or means.partial_checkpointing or means.attention_checkpointing
        factors.update(SLOWDOWN_IN_CHECKPOINTED_FUSED_BACKWARD if checkpointed else SLOWDOWN_IN_FUSED_BACKWARD)
    return math.prod(factors[name] for name in SLOWDOWN if getattr(means, name) and not _subsumed(means, name))


def _subsumed(means: Means, name: str) -> bool:
    return (name == "partial_checkpointing" and means.gradient_checkpointing or
            name == "attention_checkpointing" and (means.gradient_checkpointing or means.partial_checkpointing))


@dataclass(frozen=True)
class Workload:
    """What the run asks of the GPU, from the options, before anything is loaded."""
    batch_size: int
    pixels: int                       # pixels of the largest bucket (about resolution squared)
    trained: tuple[str, ...]          # "unet", "text_encoder"
    optimizers: dict                  # trained part -> optimizer name
    mixed_precision: bool             # bf16/fp16 autocast (frozen parts and the VAE in half precision)
    cache_latents: bool
    ema_on_gpu: bool
    sample_batch: int                 # prompts rendered together (0: no samples)
    validation_batch: int             # 0: no validation
    grad_accum: int = 1
    vae_slicing: bool = True          # the VAE encodes and decodes one image at a time (on under a plan)


STATE_BYTES = {"adamw": 8, "lion": 4, "adamw8bit": 2, "lion8bit": 1}  # optimizer state bytes per parameter


@dataclass(frozen=True)
class Estimate:
    parts: dict        # name -> bytes, of the moment that peaks
    moment: str        # "training step", "latent cache filling", "samples" or "validation"

    @property
    def peak(self) -> float:
        return sum(self.parts.values())


def estimate(size: ModelSize, means: Means, work: Workload) -> Estimate:
    """The run's peak reserved GPU memory with these means, and what it is made of: what stays all run (weights,
    optimizer states) plus the largest of the moments that come and go one after another: the backward pass, the
    VAE encoding images (latent cache filling, or every step without the cache), samples, validation."""
    a = ACTIVATIONS
    trained = {"unet": size.unet, "text_encoder": size.text_encoder}
    n_trained = sum(trained[name] for name in work.trained)
    n_frozen = sum(n for name, n in trained.items() if name not in work.trained)
    half = 2 if work.mixed_precision else 4
    weight_bytes = 2 if means.bf16_weights else 4
    states = sum(trained[name] * STATE_BYTES[_optimizer(work.optimizers[name], means)] for name in work.trained)
    static = {"trained weights": n_trained * weight_bytes, "frozen weights": n_frozen * half,
              "VAE": size.vae * half, "optimizer states": states,
              "rounding errors": n_trained * 2 if means.bf16_weights and means.compensated_rounding else 0,
              "EMA": n_trained * weight_bytes if work.ema_on_gpu else 0, "CUDA workspaces": a.fixed_gib * GiB}
    per_image = work.pixels / size.vae_scale ** 2 * size.unet_channels  # latent pixels x channels
    # fused_backward: at most a bucket of gradients exists at a time (and while it steps, fp32 copies of its
    # weights and gradients, the latter made from a bf16 concatenation: 12 bytes per element at most).
    gradients = min(n_trained, BUCKET_ELEMENTS) * 12 if means.fused_backward else n_trained * weight_bytes
    # Gradients of earlier steps of a grad_accum window stay through the next steps.
    carried = n_trained * weight_bytes if work.grad_accum > 1 else 0
    if means.gradient_checkpointing:
        # The kept block inputs shrink while the gradients grow: the larger of the two, plus one recomputed block.
        backward = {"recomputed block": work.batch_size * per_image * a.recompute,
                    "kept block inputs or gradients": max(work.batch_size * per_image * a.boundaries, gradients)}
    else:
        # Under autocast fp32 weights are cast to bf16 for the forward, and the copies are kept for the backward;
        # the backward pass peaks at its start, before the gradients add up.
        casts = n_trained * 2 if work.mixed_precision and not means.bf16_weights else 0
        kept = a.partial if means.partial_checkpointing else a.attention if means.attention_checkpointing else \
            a.training
        # Checkpointing keeps only each text encoder layer's input, too little to count.
        checkpointed = means.partial_checkpointing or means.attention_checkpointing
        text = work.batch_size * size.text_length * size.text_encoder_width * size.text_encoder_layers * \
            a.text_encoder if "text_encoder" in work.trained and not checkpointed else 0
        backward = {"activations and autocast weight copies": max(work.batch_size * per_image * kept + text + casts,
                                                                  gradients)}
    if carried:
        backward["gradients of the window"] = carried
    encoding = {"VAE encoding": work.pixels * a.vae_encode * (1 if work.vae_slicing else work.batch_size),
                "gradients of the window": carried}
    moments = {"backward pass": backward,
               "latent cache filling" if work.cache_latents else "VAE encoding": encoding}
    if work.sample_batch:  # gradients are freed by then; cfg doubles the batch
        moments["samples"] = {"sampling": 2 * work.sample_batch * per_image * a.inference,
                              "VAE decoding": work.pixels * a.vae_decode * (
                                  1 if work.vae_slicing else work.sample_batch)}
    if work.validation_batch:
        moments["validation"] = {"validation": work.validation_batch * per_image * a.inference,
                                 "VAE encoding": work.pixels * a.vae_encode * (
                                     1 if work.vae_slicing else work.validation_batch)}
    moment = max(moments, key=lambda m: sum(moments[m].values()))
    return Estimate({**static, **moments[moment]}, moment)


def _optimizer(name: str, means: Means) -> str:
    return EIGHT_BIT.get(name, name) if means.eight_bit_states else name


@dataclass(frozen=True)
class MemoryPlan:
    means: Means
    estimate: Estimate
    budget: float      # bytes the plan had to fit in (after the safety margin)
    card: float        # bytes of the GPU (or the vram option)
    fixed: tuple[str, ...]  # means the user set, which the plan kept

    optimizers: dict   # trained part -> optimizer name, after the 8-bit switch

    def lines(self) -> list[str]:
        e = self.estimate
        parts = ", ".join(f"{name} {b / GiB:.2f}" for name, b in e.parts.items() if b)
        optimizers = ", ".join(f"{part} {name}" for part, name in self.optimizers.items())
        return [f"Memory plan for {self.card / GiB:.1f} GiB (fits in {self.budget / GiB:.1f} GiB after the margin): "
                f"{self.means.describe()}; optimizers {optimizers}"
                + (f" (set by you: {', '.join(self.fixed)})" if self.fixed else ""),
                f"Memory plan: estimated peak {e.peak / GiB:.2f} GiB reserved, at {e.moment} ({parts} GiB)"]


def check_means(args, optimizer_file: dict, processes: int) -> None:
    """ConfigError for a means turned on in the options that cannot work with the rest of them."""
    names = optimizer_names(optimizer_file)
    trained = [part for part, frozen in (("unet", args.disable_unet_training),
                                         ("text_encoder", args.disable_textenc_training)) if not frozen]
    for key in ("fused_backward", "bf16_weights"):
        if getattr(args, key):
            for part in trained:
                check_steps_per_parameter(names[part], part, args.optimizer_config)
    if args.fused_backward and processes > 1:
        raise ConfigError(f"{args.sources.get('fused_backward', 'defaults')}: fused_backward trains on one process "
                          f"only (the processes must average each gradient before it is used); this run has "
                          f"{processes}. Turn it off for multi-GPU runs.")


def _usable(work: Workload, args, processes: int) -> dict[str, bool]:
    """Which means a plan may turn on here: each where it saves memory and works with the options."""
    names = set(work.optimizers[name] for name in work.trained)
    element_wise = names <= set(ELEMENT_WISE) and args.mixed_precision != "fp16"
    return {"fused_backward": element_wise and args.grad_accum == 1 and not args.clip_grad_norm and processes == 1,
            "eight_bit_states": bool(names & set(EIGHT_BIT)),
            "gradient_checkpointing": True,
            "partial_checkpointing": True,
            "attention_checkpointing": True,
            "bf16_weights": element_wise}


def choose(size: ModelSize, work: Workload, card_bytes: float, args, processes: int = 1) -> MemoryPlan:
    """The fastest fitting means for `card_bytes` of GPU memory; a means set in the options stays as set. bf16
    weights round compensated where that still fits with ESTIMATE_ERROR to spare (bf16_rounding auto), or as
    bf16_rounding says. Raises ConfigError (with the largest batch that fits) when even the leanest plan does not
    fit."""
    budget = card_bytes - max(SAFETY_MARGIN * card_bytes, MIN_MARGIN_GIB * GiB)
    fixed = {name: getattr(args, name) for name in SLOWDOWN if args.sources.get(name, "defaults") != "defaults"}
    usable = _usable(work, args, processes)
    free = [name for name in SLOWDOWN if name not in fixed and usable[name]]
    compensated = args.bf16_rounding == "compensated"
    candidates = []
    for chosen in itertools.chain.from_iterable(itertools.combinations(free, k) for k in range(len(free) + 1)):
        means = Means(**{name: name in chosen or bool(fixed.get(name)) for name in SLOWDOWN},
                      compensated_rounding=compensated)
        if not any(_subsumed(means, name) for name in chosen):
            candidates.append((slowdown(means), means))
    candidates.sort(key=lambda c: c[0])
    for _, means in candidates:
        e = estimate(size, means, work)
        if e.peak <= budget:
            if means.bf16_weights and args.bf16_rounding == "auto":
                upgraded = replace(means, compensated_rounding=True)
                upgraded_estimate = estimate(size, upgraded, work)
                if upgraded_estimate.peak * (1 + ESTIMATE_ERROR) <= budget:
                    means, e = upgraded, upgraded_estimate
            return MemoryPlan(means, e, budget, card_bytes, tuple(fixed),
                              {part: _optimizer(work.optimizers[part], means) for part in work.trained})
    leanest = Means(**{name: name in free or bool(fixed.get(name)) for name in SLOWDOWN},  # no means adds memory
                    compensated_rounding=compensated)
    e = estimate(size, leanest, work)
    fits = [b for b in range(work.batch_size - 1, 0, -1) if estimate(size, leanest, replace(work, batch_size=b)).peak
            <= budget]
    advice = f"Lower batch_size to {fits[0]}, the largest that fits" if fits else \
        "Not even batch_size 1 fits: lower the resolution or freeze the text encoder (disable_textenc_training)"
    raise ConfigError(f"vram: {card_bytes / GiB:.1f} GiB cannot hold this run: even with {leanest.describe()} the "
                      f"estimated peak is {e.peak / GiB:.1f} GiB (at {e.moment}), over the {budget / GiB:.1f} GiB "
                      f"usable. {advice}; or give vram a larger number if the GPU has more free memory than was "
                      "measured.")


def workload(args, optimizer_file: dict, records, sample_settings, validation_batch: int) -> Workload:
    """What the options ask of the GPU."""
    sampling = sample_settings.every_n_steps > 0
    return Workload(batch_size=args.batch_size, pixels=max(r.bucket[0] * r.bucket[1] for r in records),
                    trained=tuple(name for name, frozen in (("unet", args.disable_unet_training),
                                                            ("text_encoder", args.disable_textenc_training))
                                  if not frozen),
                    optimizers=optimizer_names(optimizer_file),
                    mixed_precision=args.mixed_precision != "no" and not args.disable_amp,
                    cache_latents=args.cache_latents,
                    ema_on_gpu=args.ema_device == "cuda" and bool(args.ema_decay_rate or args.ema_strength_target),
                    sample_batch=sample_settings.batch_size if sampling else 0, validation_batch=validation_batch,
                    grad_accum=args.grad_accum, vae_slicing=args.vram != "off")


def plan_run(args, size: ModelSize, work: Workload, device, processes: int = 1) -> MemoryPlan:
    """The plan for this run on the GPU `device`, applied to `args`: the chosen means are set as options, for
    prepare_models and the optimizers to read."""
    import torch

    card = args.vram * GiB if args.vram != "auto" else torch.cuda.mem_get_info(device)[0]
    plan = choose(size, work, card, args, processes)
    for name in SLOWDOWN:
        setattr(args, name, getattr(plan.means, name))
    args.bf16_rounding = "compensated" if plan.means.compensated_rounding else "stochastic"
    return plan


def model_size(path) -> ModelSize:
    from utils.model import models

    try:
        return ModelSize.from_configs(models.read_configs(path))
    except models.ModelLoadError as e:
        raise ConfigError(str(e)) from None
