"""The one registry of every option the trainer takes.

Each `Flag` is declared once here; `utils/options/config.py` turns the registry into argparse, merges it with the
JSON config file and validates it, and `python -m utils.options.config` writes the flag table in doc/FLAGS.md.
Names, types and defaults follow EveryDream2 (../shared/spec/REFERENCE.md §1.2) so existing train.json
files keep working.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from utils.options.values import DEFAULT_MASK_SUFFIX

BUCKET_RESOLUTIONS = (256, 320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960, 1024, 1088, 1152, 1280, 1536)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass(frozen=True)
class Flag:
    name: str
    type: type  # bool, int, float, str, list (of strings), or object for free-form JSON values
    default: Any
    help: str
    group: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    live: bool = False  # with load_settings_every_epoch, a change in the config file applies at the next epoch
    aliases: tuple[str, ...] = ()  # other names of the same option (JSON key and command-line flag alike)


def _flags(group: str, *specs: tuple) -> list[Flag]:
    return [Flag(*spec[:4], group=group, **(spec[4] if len(spec) > 4 else {})) for spec in specs]


FLAGS: list[Flag] = [
    *_flags(
        "Model and data",
        ("resume_ckpt", str, None, "Base model: a diffusers folder, a single .safetensors/.ckpt file (SD1.x or SD2.x, "
         "original layout), or `findlast` for the newest checkpoint under logdir (see findlast_scope). Required. "
         "Nothing is downloaded: a Hugging Face id (`owner/name`) must first be downloaded by hand."),
        ("data_root", str, None, "Folder of training images with their captions (searched recursively), or a manifest .json "
         "listing them (doc/DATA.md). Required."),
        ("resolution", int, 512, "Training resolution; selects the aspect-ratio bucket table. A multiple of 64.",
         {"min": 64, "max": 2048}),
        ("batch_size", int, 2, "Images per step (per process with several GPUs, doc/MULTI_GPU.md).", {"min": 1}),
        ("flip_p", float, 0.0, "Probability of flipping each image horizontally, for images whose folder "
         "(flip_p.txt, yaml) or sidecar sets none.", {"min": 0, "max": 1}),
        ("shuffle_tags", bool, False, "Shuffle the comma-separated tags of every caption each epoch (first part "
         "stays first); tags with yaml weights are drawn by weight instead."),
        ("keep_tags", int, 0, "With tag shuffling: keep the first N tags in place.", {"min": 0}),
        ("write_schedule", bool, False, "Write logdir/<run>/ep<N>_batch_schedule.txt: the order images are trained in."),
        ("rated_dataset", bool, False, "Train fewer, better-rated images as epochs go by (yaml `rating`)."),
        ("rated_dataset_target_dropout_percent", int, 50, "With rated_dataset: the percent of images that later "
         "epochs shrink towards (see doc/DATA.md for the exact schedule).", {"min": 0, "max": 100}),
        ("validation_config", str, None, "Validation settings JSON (see doc/VALIDATION.md); unset = no validation."),
        ("mask_suffix", str, DEFAULT_MASK_SUFFIX, "A loss mask beside image NAME.jpg is NAME<mask_suffix>.png "
         "(any image extension): white = learn, black = ignore (doc/DATA.md, Masks). A folder's local.yaml or "
         "global.yaml may name another."),
    ),
    *_flags(
        "Training",
        ("max_epochs", int, 300, "Epochs to train.", {"min": 1}),
        ("grad_accum", int, 1, "Steps (batches) whose gradients are summed before each optimizer update.", {"min": 1}),
        ("lr", float, None, "Learning rate for UNet and text encoder; overrides optimizer.json.", {"min": 0}),
        ("lr_scheduler", str, "constant", "LR schedule when optimizer.json sets none.", {"choices": LR_SCHEDULERS}),
        ("lr_warmup_steps", int, None, "Warmup steps; unset = 2% of lr_decay_steps.", {"min": 0}),
        ("lr_decay_steps", int, None, "Steps for the LR to reach 0; unset or 0 = 1.5 x the whole run.", {"min": 0}),
        ("optimizer_config", str, "optimizer.json", "Optimizer settings JSON (path relative to the working directory). "
         "A missing default file means AdamW8bit with lr 1e-6."),
        ("scale_lr", bool, False, "Multiply the learning rates by (batch_size x grad_accum x processes)^0.55; the "
         "rates used are logged."),
        ("disable_textenc_training", bool, False, "Freeze the text encoder."),
        ("disable_unet_training", bool, False, "Freeze the UNet."),
        ("disable_amp", bool, False, "Train in full fp32 (no mixed precision) on a GPU; the same as "
         "mixed_precision no."),
        ("gradient_checkpointing", bool, False, "Trade speed for memory: recompute activations in the backward pass "
         "(the memory plan turns it on when needed unless set, doc/MEMORY.md)."),
        ("partial_checkpointing", bool, False, "Gradient checkpointing of the UNet's highest-resolution blocks only "
         "(its first down block and last up block), which keep the largest share of the activations, and of a "
         "trained text encoder: part of gradient_checkpointing's saving at a fraction of its cost "
         "(doc/MEMORY.md). No effect when gradient_checkpointing is on; the memory plan turns it on when needed "
         "unless set."),
        ("attention_checkpointing", bool, False, "Gradient checkpointing of the transformer blocks at the UNet's "
         "highest resolution only (their attention over every latent pixel keeps the most activations per "
         "computation), and of a trained text encoder: most of partial_checkpointing's saving for less than half "
         "its recomputation (doc/MEMORY.md). No effect when partial_checkpointing or gradient_checkpointing is on; "
         "the memory plan turns it on when needed unless set."),
        ("attn_type", str, "sdp", "Attention kernel: sdp (PyTorch), xformers (if installed), slice (least memory).",
         {"choices": ("sdp", "xformers", "slice")}),
        ("max_skipped_updates", int, 25, "Stop the run (saving the last finite weights) after this many optimizer "
         "updates in a row whose gradients are not finite; each such update is skipped.", {"min": 1}),
        ("clip_grad_norm", float, None, "Clip UNet and text encoder gradient norms to this value.", {"min": 0}),
        ("seed", int, 555, "Seed for shuffling, noise and samples; -1 = random.", {"min": -1}),
        ("gpuid", int, 0, "CUDA device index; under torchrun or accelerate launch each process takes its own.",
         {"min": 0}),
        ("mixed_precision", str, "auto", "Mixed precision on a GPU: auto (bf16 where the GPU supports it, else fp16), "
         "bf16, fp16, or no (full fp32, as disable_amp). On the CPU training is fp32: auto and no only.",
         {"choices": ("auto", "bf16", "fp16", "no")}),
        ("allow_cpu", bool, False, "Train on the CPU although this machine has an NVIDIA GPU that PyTorch cannot use "
         "(a CPU-only torch build, or a driver too old for it). Without it such a run stops at start with the command "
         "that installs a CUDA build of torch. Machines without an NVIDIA GPU train on the CPU either way (slowly)."),
    ),
    *_flags(
        "Speed and memory",
        ("cache_latents", bool, False, "Keep each image's VAE latents on disk (in latent_cache_dir) and reuse them in "
         "later epochs and runs instead of running the VAE every step. Each image then keeps one crop, chosen from "
         "its content; flips still vary (doc/PERFORMANCE.md)."),
        ("latent_cache_dir", str, None, "Folder of the latent cache, shared by runs; unset = <logdir>/latent_cache."),
        ("channels_last", bool, False, "Store the UNet's weights channels-last (NHWC), the layout GPU convolution "
         "kernels read fastest."),
        ("compile", bool, False, "torch.compile the UNet and the text encoder: faster steps after a warm-up at the "
         "first step (minutes), and a warm-up like it for each new bucket shape and at the first sample and "
         "validation pass (torch keeps up to 8 compiled versions of each; shapes after that run uncompiled); it pays "
         "for long runs at larger batches "
         "(doc/PERFORMANCE.md). Compiled kernels are kept in a cache on disk (TORCHINDUCTOR_CACHE_DIR, default "
         "~/.cache/sdtrainer/torchinductor), so later runs start in seconds."),
        ("vram", object, "auto", "GPU memory to plan for (doc/MEMORY.md): auto = what the GPU has free at the start, "
         "a number of GiB (e.g. 8 for an 8 GB card; less to leave room for other programs), or off (no plan: the "
         "memory options as given). The plan turns on the fastest memory means that fit the batch size: "
         "fused_backward, 8-bit optimizer states, attention_checkpointing, partial_checkpointing, "
         "gradient_checkpointing, bf16_weights. A "
         "means set in the config or on the command line stays as set. It never changes batch size, learning rate "
         "or what is trained."),
        ("fused_backward", bool, False, "Update each weight inside the backward pass as soon as its gradient is "
         "ready, so the whole model's gradients never exist at once (saves 4 bytes per trained parameter). Needs "
         "an element-wise optimizer (adamw, adamw8bit, lion, lion8bit), no clip_grad_norm and one process."),
        ("bf16_weights", bool, False, "Keep the trained weights in bf16 and round each update back to bf16 as "
         "bf16_rounding says (saves the bf16 copies autocast makes of fp32 weights, and with stochastic rounding 2 "
         "bytes per trained parameter). Needs an element-wise optimizer and bf16 or no mixed precision. Saved "
         "checkpoints are written as before. What it costs in speed depends on the other means (inside a backward "
         "pass without checkpointing, nothing measurable); a memory plan (vram) pairs it with fused_backward where "
         "that is the faster way (doc/MEMORY.md)."),
        ("bf16_rounding", str, "auto", "How bf16_weights rounds each update back to bf16: stochastic (up or down with "
         "the probability of the remainder: right on average, but noisy where updates are far below bf16's spacing, "
         "as at fine-tuning learning rates) or compensated (to nearest, with each weight's rounding error kept in a "
         "second bf16 tensor and added back at its next update, Kahan summation: updates add up as in fp32; 2 more "
         "bytes per trained parameter, saved with the optimizer state). auto: compensated where the memory plan "
         "(vram) has room for it, stochastic where it has not and with vram off (doc/MEMORY.md).",
         {"choices": ("auto", "stochastic", "compensated")}),
    ),
    *_flags(
        "Objective and noise",
        ("cond_dropout", float, 0.04, "Probability a caption is replaced by the empty caption.", {"min": 0, "max": 1}),
        ("loss_type", str, "mse_huber", "mse, huber, mse_huber (MSE at t=0 to Huber at t=999) or huber_mse.",
         {"choices": ("mse", "huber", "mse_huber", "huber_mse")}),
        ("timestep_start", int, 0, "Lowest training timestep (inclusive).", {"min": 0, "max": 999}),
        ("timestep_end", int, 1000, "Highest training timestep (exclusive).", {"min": 1, "max": 1000}),
        ("train_sampler", str, "ddpm", "Noise scheduler used to noise training latents.",
         {"choices": ("ddpm", "pndm", "ddim")}),
        ("zero_frequency_noise_ratio", float, 0.02, "Offset-noise strength (0 = off).", {"min": 0, "live": True}),
        ("pyramid_noise_discount", float, None, "Pyramid (multi-resolution) noise: each coarser level of noise "
         "is weighted by this discount once more (e.g. 0.4-0.8); unset or 0 = off.", {"min": 0}),
        ("embedding_perturbation", float, 0.0, "Gaussian noise added to the text encoder's output while training, "
         "std = value / sqrt(embedding width); 0 = off.", {"min": 0}),
        ("min_snr_gamma", float, None, "Min-SNR loss weighting gamma (e.g. 5): per-image weight min(SNR, gamma)/SNR "
         "(epsilon) or min(SNR, gamma)/(SNR+1) (v-prediction); unset or 0 = off.", {"min": 0, "live": True}),
        ("masked_loss_unmasked_weight", float, 0.0, "Loss weight of the black (masked-out) parts of images with a "
         "loss mask, grey in between: 0 = they do not count, 1 = masks change nothing. Each image's loss is the "
         "weighted mean over its pixels, so a white mask trains as no mask (doc/DATA.md, Masks).",
         {"min": 0, "max": 1}),
        ("enable_zero_terminal_snr", bool, False, "Rescale betas so the last timestep has zero SNR (v-prediction "
         "models only). Samples use trailing DDIM steps and guidance rescale 0.7; saved checkpoints keep the "
         "rescaled scheduler."),
        ("clip_skip", int, 0, "Condition on the text encoder's hidden state N layers from the end, through its "
         "final layer norm: 2 = penultimate on SD1.x, one further back than the default on SD2.x; 0 and 1 = last.",
         {"min": 0, "max": 4, "live": True}),
        ("load_settings_every_epoch", bool, False, "Re-read the --config file at each epoch start and apply the "
         "options marked live; changes to other options are refused with a warning, an unreadable or invalid file "
         "keeps the previous settings (doc/TRAINING.md)."),
        ("rectified_flow", bool, False,
         "Train with the rectified-flow objective (v-prediction models; doc/RECTIFIED_FLOW.md)."),
        ("reflow_steps", int, 0, "Reflow iterations before the main epochs (needs rectified_flow).", {"min": 0}),
        ("reflow_sample_steps", int, 0, "Euler steps when generating reflow pairs; 0 = sample_steps, else 50.",
         {"min": 0}),
        ("reflow_train_epochs", int, 1, "Passes over the generated pairs per reflow iteration.", {"min": 1}),
        ("reflow_gen_batches", int, 1, "Training batches used as generation seeds per reflow iteration.", {"min": 1}),
    ),
    *_flags(
        "EMA",
        ("ema_decay_rate", float, None, "Train an EMA (moving average) model of the trained weights with this decay "
         "per update, e.g. 0.999 (doc/EMA.md); unset = no EMA.", {"min": 0, "max": 1}),
        ("ema_strength_target", float, None, "Train an EMA model whose decay is chosen so that decay ** (steps in "
         "the run / steps per EMA update) = this value, e.g. 0.1; the decay is logged. Overrides ema_decay_rate.",
         {"min": 0, "max": 1}),
        ("ema_update_interval", int, 500, "Optimizer updates between EMA updates, i.e. every ema_update_interval x "
         "grad_accum steps.", {"min": 1}),
        ("ema_device", str, "cpu", "Where the EMA weights live: cpu (saves GPU memory, slower updates) or cuda.",
         {"choices": ("cpu", "cuda")}),
        ("ema_sample_nonema_model", bool, False, "With EMA: sample the training model (alone, or beside the EMA "
         "model with ema_sample_ema_model)."),
        ("ema_sample_ema_model", bool, False, "With EMA: sample the EMA model (the default when neither sample "
         "flag is set)."),
        ("ema_resume_model", str, None, "With EMA: start the EMA from this checkpoint (an `_ema` diffusers folder or "
         ".safetensors file), or `findlast` for the newest `_ema` folder under logdir (see findlast_scope); unset = a "
         "copy of the model being trained.", {"aliases": ("ema_decay_resume_model",)}),
    ),
    *_flags(
        "Samples",
        ("sample_prompts", str, "sample_prompts.txt", "What to sample during training: a .txt file (one prompt per "
         "line) or a .json sample config with every setting (doc/SAMPLES.md). Missing or empty = captions from "
         "the current batch."),
        ("sample_steps", int, 250, "Sample every N steps; 0 = never. A .json sample config's "
         "generate_samples_every_n_steps wins over this, unless it is given on the command line.", {"min": 0}),
        ("generate_pretrain_samples", bool, True, "Also sample once before training (step 0). A .json sample "
         "config's key of the same name wins over this, unless it is given on the command line."),
    ),
    *_flags(
        "Logging and checkpoints",
        ("project_name", str, "myproj", "Prefix of the log folder and checkpoint names."),
        ("run_name", str, None, "Name of the run for trackers: the TensorBoard `config` and `run_name` texts, the "
         "run's log and _main.json. The log folder is `<project_name>_<YYYYMMDD-HHMMSS>` either way, as "
         "in EveryDream2."),
        ("logdir", str, "logs", "Parent folder of the per-run log folders."),
        ("findlast_scope", str, "logdir", "Where `findlast` (resume_ckpt, ema_resume_model) looks: logdir = the "
         "newest checkpoint of any run under logdir, as in EveryDream2 (chained runs may change project_name); "
         "project = only this project_name's run folders (`<logdir>/<project_name>_<YYYYMMDD-HHMMSS>`).",
         {"choices": ("logdir", "project")}),
        ("log_step", int, 25, "Log scalars to TensorBoard every N steps.", {"min": 1}),
        ("save_ckpt_dir", str, None, "Where single-file .safetensors checkpoints go; unset = the run's ckpts folder."),
        ("save_every_n_epochs", int, None, "Save a checkpoint every N epochs; unset or <1 = never.", {"live": True}),
        ("ckpt_every_n_minutes", float, None, "Save a checkpoint every N minutes (fractions allowed); unset or 0 "
         "= never. 20 when neither cadence is set.", {}),
        ("save_ckpts_from_n_epochs", int, 0, "No epoch-cadence saves before this epoch.", {"min": 0, "live": True}),
        ("save_full_precision", bool, False, "Write the single-file checkpoint in fp32 instead of fp16.", {"live": True}),
        ("save_optimizer", bool, False, "Also save optimizer state (optimizer_unet.pt, optimizer_te.pt) in the diffusers "
         "folder; resuming from that folder loads it.", {"live": True}),
        ("no_save_ckpt", bool, False, "Save diffusers folders only, no single-file .safetensors."),
        ("no_prepend_last", bool, False, "Do not prefix the final checkpoint with `last-`."),
        ("plugins", list, None, "Plugin classes to load, as `module.Class` (doc/PLUGINS.md); on the command line "
         "separated by spaces: `--plugins my_plugins.Counter utils.plugins.accumulnator.Accumulnator`."),
        ("wandb", bool, False, "Also log to Weights & Biases (an optional package: `pip install wandb`, then "
         "`wandb login`, or set the environment variable WANDB_MODE=offline and `wandb sync` later): the same "
         "scalars, sample images and run config as TensorBoard, which is still written. The W&B project is "
         "project_name and the run's name is run_name (unset: the run folder's name); W&B's files go in the run "
         "folder's `wandb/`. See doc/TRAINING.md (Weights & Biases)."),
    ),
]


@dataclass(frozen=True)
class LegacyKey:
    """An EveryDream2 switch that does nothing here: accepted in JSON and on the command line (`--name`,
    `--no-name`) so old configs and command lines still run, with one note saying what to use instead."""
    name: str
    note: str  # what the switch does here, shown when it is set to true
    note_if_false: str | None = None  # shown when it is set to false, where that might have been meant to act

    def note_for(self, value) -> str | None:
        if value is None:
            return None
        return self.note_if_false if value is False else self.note


LEGACY_KEYS: dict[str, LegacyKey] = {key.name: key for key in (
    LegacyKey("amp", "ignored: mixed precision is on by default (see mixed_precision); turn it off with disable_amp",
              note_if_false="ignored: it does not turn mixed precision off (nor did it in EveryDream2); set "
                            "disable_amp or mixed_precision 'no' for full fp32"),
    LegacyKey("useadam8bit", "ignored: choose the optimizer in optimizer_config's file (`\"optimizer\": "
              "\"adamw8bit\"`, also the default when that file does not exist; doc/OPTIMIZERS.md)"),
    LegacyKey("lowvram", "ignored: the memory plan (vram, default auto) fits the run to the GPU; "
              "cfgs/lowvram.json turns every memory means on at batch 1 (`--config cfgs/lowvram.json`; SD1.5 at 512 "
              "in about 5 GiB, doc/MEMORY.md)"),
    LegacyKey("disable_xformers", "ignored: choose the attention kernel with attn_type (the default, sdp, does not "
              "use xformers)"),
    LegacyKey("ed1_mode", "ignored: SD1 attention settings are detected from the model"),
    LegacyKey("notebook", "ignored: it has no effect here"),
)}

BY_NAME: dict[str, Flag] = {flag.name: flag for flag in FLAGS}
# Another name of an option -> the option's name.
ALIASES: dict[str, str] = {alias: flag.name for flag in FLAGS for alias in flag.aliases}
