"""Building a run: `read_inputs` checks everything the user gave (options, data, optimizer, sample, validation and
plugin files) before anything heavy happens; `build_trainer` loads the model, makes the run folder, the optimizers,
the EMA and the loop's parts, and resumes a saved run's state. train.py and scripts/bench.py set up through here."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import data
from data.latent_cache import LatentCache
from optimizer.freezing import freeze_text_encoder
from optimizer.optimizers import EIGHT_BIT, TrainingOptimizers, check_optimizers_run_here, optimizer_names, \
    read_optimizer_file, resolve_settings
from utils.objective import flow
from utils.options import config
from utils.options.config import ConfigError
from utils.plugins import PluginRunner, load_plugins
from utils.run import memory, training_state
from utils.run.checkpoint import EMA_SUFFIX, find_last_for
from utils.run.setup import cuda_device, dataloader_workers, find_nvidia_gpu, freeze_clip_skipped_layers, \
    make_accelerator, prepare_models, unusable_gpu
from utils.watch import ema, sampling, validation

log = logging.getLogger("train")

# Everything that is the user's to fix: reported in one line, exit code 2.
START_ERRORS = (ConfigError, data.DataError, FileNotFoundError)


@dataclass
class Inputs:
    """What the user gave, checked; nothing loaded yet."""
    args: object
    resume: Path
    saved_state: training_state.TrainingState | None
    ema_resume: Path | None
    optimizer_file: dict
    scan: data.ScanResult
    records: list
    validation_cfg: validation.ValidationConfig | None
    validation_sets: dict
    samples: sampling.SampleSchedule
    plugins: PluginRunner
    memory_plan: memory.MemoryPlan | None = None


def read_inputs(argv: list[str] | None) -> Inputs:
    """Raises one of START_ERRORS, naming the file or key and the fix, before any model loads or folder is made."""
    args = config.load(argv)
    flow.check_options(args)
    for note in args.notes:
        log.warning(note)
    _check_gpu_usable(args)
    resume = find_last_for(args) if args.resume_ckpt == "findlast" else Path(args.resume_ckpt)
    if args.resume_ckpt == "findlast":
        log.info("resume_ckpt findlast: %s", resume)
    saved_state = training_state.load(resume) if resume.is_dir() else None
    ema_resume = ema.check_options(args)
    if saved_state and ema_resume is None and ema.enabled(args) and resume.with_name(resume.name + EMA_SUFFIX).is_dir():
        ema_resume = resume.with_name(resume.name + EMA_SUFFIX)  # the run's own EMA continues with it
    optimizer_file = read_optimizer_file(args.optimizer_config)
    check_optimizers_run_here(optimizer_file, args.optimizer_config,
                              cuda_device(args) if torch.cuda.is_available() else "cpu")
    plugins = PluginRunner(load_plugins(args.plugins, args.sources.get("plugins", "defaults")))
    scan = data.scan(args.data_root, args.mask_suffix)
    scan.require_images()
    records = data.assign_buckets(scan.records, args.resolution)
    validation_cfg = validation.load_validation_config(args.validation_config) if args.validation_config else None
    validation_sets = {}
    if validation_cfg:
        records, validation_sets = validation.split_records(records, validation_cfg, args.resolution,
                                                            args.mask_suffix)
    samples = sampling.SampleSchedule.from_args(args)
    for line in scan.summary_lines():
        log.warning(line)
    device = cuda_device(args) if torch.cuda.is_available() else torch.device("cpu")
    validation_batch = (validation_cfg.batch_size or args.batch_size) if validation_cfg else 0
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    memory.check_means(args, optimizer_file, processes)
    plan = None
    if args.vram != "off" and device.type == "cuda":
        plan = memory.plan_run(args, memory.model_size(resume), memory.workload(
            args, optimizer_file, records, samples.settings, validation_batch), device, processes)
    for line in plan.lines() if plan else []:
        log.info(line)
    if plan and args.eight_bit_states:
        check_optimizers_run_here(_eight_bit(optimizer_file), f"{args.optimizer_config} (as the memory plan's "
                                  "8-bit states switch it)", device)
    return Inputs(args, resume, saved_state, ema_resume, optimizer_file, scan, records, validation_cfg,
                  validation_sets, samples, plugins, plan)


def _eight_bit(optimizer_file: dict) -> dict:
    """optimizer.json's choices with the 8-bit form of each optimizer that has one."""
    names = optimizer_names(optimizer_file)
    return {"base": {"optimizer": EIGHT_BIT.get(names["unet"], names["unet"])},
            "text_encoder_overrides": {"optimizer": EIGHT_BIT.get(names["text_encoder"], names["text_encoder"])}}


def _check_gpu_usable(args) -> None:
    """A machine with an NVIDIA GPU that PyTorch cannot use trains on the CPU only when allow_cpu says so."""
    if torch.cuda.is_available():
        return
    problem = unusable_gpu(find_nvidia_gpu(), False, torch.__version__, torch.version.cuda,
                           os.environ.get("CUDA_VISIBLE_DEVICES"))
    if problem is None:
        return
    if not args.allow_cpu:
        raise ConfigError(f"{problem} To train on the CPU anyway, set allow_cpu (--allow_cpu).")
    log.warning("%s Training on the CPU, as allow_cpu asks.", problem)


def build_trainer(inputs: Inputs):
    """The loop, ready to run; raises one of START_ERRORS for what is only found once the model is loaded."""
    from utils.run.loop import Trainer

    args = inputs.args
    torch.manual_seed(args.seed)
    accelerator = make_accelerator(args)
    if args.reflow_steps and accelerator.num_processes > 1:
        raise ConfigError(f"{args.sources.get('reflow_steps', 'defaults')}: reflow_steps trains on one process only "
                          "(its generated pairs are not split between processes yet); run the reflow phase with plain "
                          f"`python train.py`, then train on {accelerator.num_processes} processes from its checkpoint.")
    model, noise_scheduler = _load_model(inputs)
    trained = prepare_models(model, args, accelerator)
    try:
        text_encoder_training = freeze_text_encoder(trained, inputs.optimizer_file.get("text_encoder_freezing"),
                                                    args.optimizer_config)
        # The EMA lives with the first process, which samples and saves it.
        ema_start = ema.load_start(inputs.ema_resume, trained) \
            if inputs.ema_resume and accelerator.is_main_process else None
    except _model_errors() as e:
        raise ConfigError(str(e)) from None
    fingerprint = training_state.fingerprint(args, inputs.records, accelerator.num_processes, list(trained))
    saved_state = _continuing(inputs, fingerprint, accelerator.num_processes)

    # Data parallel (doc/MULTI_GPU.md): each step's global batch of batch_size x processes images is planned as one
    # and split by slot; the first process alone writes the run folder, logs, samples and checkpoints.
    from utils.run.run_dir import RunDir

    run = RunDir(args, inputs.optimizer_file) if accelerator.is_main_process else None
    if run:
        for line in data.report_undersized(inputs.records, run.path):
            log.warning(line)
    epoch_data = _epoch_data(inputs, model, accelerator)
    first_plan = epoch_data.plan(0, args.grad_accum)
    steps_per_epoch = len(first_plan)
    settings = resolve_settings(inputs.optimizer_file, args, steps_per_epoch, accelerator.num_processes)
    opts = make_optimizers(trained, settings, args, accelerator)
    if run:
        run.write_json("opt", {name: vars(s) for name, s in settings.items() if name in trained})
    ema_model = None
    if ema.enabled(args) and accelerator.is_main_process:
        ema_model = ema.EMA(trained, ema.resolve_decay(args, steps_per_epoch), args.ema_update_interval,
                            accelerator.device if args.ema_device == "cuda" else torch.device("cpu"), ema_start)
        log.info("EMA: starting from %s.", inputs.ema_resume or "the model being trained")
        del ema_start  # the EMA holds its own copy now
    _load_optimizer_states(opts, inputs.resume)
    log.info("Model: %s", model.describe())  # before DistributedDataParallel wraps the trained models
    for line in model.carried_summary():
        log.info(line)
    if accelerator.num_processes > 1 and "text_encoder" in trained and args.clip_skip >= 2:
        freeze_clip_skipped_layers(model.text_encoder, args.clip_skip)
    for name, module in trained.items():
        setattr(model, name, accelerator.prepare(module))
    parts = _parts(inputs, model, noise_scheduler, accelerator, opts, run, ema_model, trained, epoch_data)
    trainer = Trainer(args=args, accelerator=accelerator, model=model, noise_scheduler=noise_scheduler,
                      trained=trained, opts=opts, data=epoch_data, fingerprint=fingerprint, run=run, parts=parts,
                      reflow=_reflow(args, model, accelerator, run, saved_state))
    if saved_state:
        trainer.load_state_dict(saved_state)
        log.info("Resuming the run of %s at epoch %d, step %d of it (global step %d).", inputs.resume,
                 saved_state.epoch, saved_state.step_in_epoch, saved_state.global_step)
    _describe(args, accelerator, epoch_data, first_plan, settings, trained, text_encoder_training, run)
    return trainer


def make_optimizers(trained: dict, settings: dict, args, accelerator) -> TrainingOptimizers:
    """The optimizers with the memory means the options (or the memory plan) chose: 8-bit states, fused backward,
    and for bf16_weights with stochastic rounding a random stream of its own, seeded from the run's seed (the plan
    resolves bf16_rounding auto; without a plan it is stochastic)."""
    from optimizer.per_parameter import STOCHASTIC_ROUNDING_SEED_OFFSET

    if args.eight_bit_states:
        for s in settings.values():
            s.optimizer = EIGHT_BIT.get(s.optimizer, s.optimizer)
    rounding = torch.Generator(accelerator.device).manual_seed(args.seed + STOCHASTIC_ROUNDING_SEED_OFFSET) \
        if args.bf16_weights and args.bf16_rounding != "compensated" else None
    return TrainingOptimizers(trained, settings, args.fused_backward, rounding)


def _model_errors() -> tuple:
    from utils.model.models import ModelLoadError
    return ConfigError, ModelLoadError, flow.ModelMismatch


def _load_model(inputs: Inputs):
    from utils.model import models

    args = inputs.args
    try:
        model = models.load(inputs.resume)
        if args.enable_zero_terminal_snr:
            model.use_zero_terminal_snr()
        noise_scheduler = model.noise_scheduler(args.train_sampler)
        flow.configure_model(model, args)
        inputs.samples.check_model(model.scheduler.config)
    except _model_errors() as e:
        raise ConfigError(str(e)) from None
    layers = model.text_encoder.config.num_hidden_layers
    if args.clip_skip > layers:
        raise ConfigError(f"{args.sources.get('clip_skip', 'defaults')}: clip_skip {args.clip_skip} reaches past the "
                          f"text encoder's {layers} layers; use at most {layers} (0 or 1 = the last layer).")
    return model, noise_scheduler


def _continuing(inputs: Inputs, fingerprint: dict, processes: int) -> training_state.TrainingState | None:
    """The saved state to continue from, or None when the checkpoint's run differs from this one."""
    saved = inputs.saved_state
    if not saved:
        return None
    changed = training_state.differences(saved.fingerprint, fingerprint)
    if any(line.startswith("num_processes") for line in changed):
        raise ConfigError(f"{inputs.resume} continues a run trained with {saved.fingerprint['num_processes']} "
                          f"processes; this run has {processes}. Launch it with {saved.fingerprint['num_processes']} "
                          f"processes to continue exactly, or copy the folder without {training_state.STATE_FILE} to "
                          "start a new run from its weights.")
    if changed:
        log.warning("%s holds a resumable run, but %s: starting a new run from its weights and optimizer state "
                    "instead of continuing that one.", inputs.resume, "; ".join(changed))
        return None
    if saved.epoch >= inputs.args.max_epochs:  # a chain's next link (EveryDream2's chaining habit)
        log.info("%s ended its run at epoch %d (max_epochs %d): starting a new run of %d epochs from its weights and "
                 "optimizer state.", inputs.resume, saved.epoch, inputs.args.max_epochs, inputs.args.max_epochs)
        return None
    return saved


def _epoch_data(inputs: Inputs, model, accelerator):
    from utils.run.epoch_data import EpochData

    args = inputs.args
    latent_cache = None
    if args.cache_latents and inputs.plugins.changes_images:
        log.warning("Latent cache off: a plugin changes the training images (transform_pil_image), so their latents "
                    "cannot be reused.")
    elif args.cache_latents:
        latent_cache = LatentCache(args.latent_cache_dir or Path(args.logdir) / "latent_cache", model.vae)
    rated = data.RatedDataset(args.max_epochs, args.rated_dataset_target_dropout_percent) if args.rated_dataset else None
    return EpochData(inputs.records, inputs.scan.skipped, model.tokenizer, args, accelerator,
                     dataloader_workers(accelerator), rated, latent_cache, inputs.plugins or None)


def _load_optimizer_states(opts, resume: Path) -> None:
    from utils.model.models import load_optimizer_states

    states = load_optimizer_states(resume) if resume.is_dir() else {}
    if not states:
        return
    try:
        opts.load_state_dicts(states)
        log.info("Loaded optimizer state from %s", resume)
    except ValueError as e:  # e.g. saved with the text encoder frozen, now trained: start the optimizer afresh
        log.warning("Optimizer state in %s does not fit this run (%s); starting with a fresh optimizer.", resume, e)


def _parts(inputs, model, noise_scheduler, accelerator, opts, run, ema_model, trained, epoch_data) -> list:
    """The loop's parts, in the order each event reaches them."""
    from utils.run.checkpointer import Checkpointer
    from utils.run.live_settings import LiveSettings
    from utils.run.plugin_hooks import PluginHooks
    from utils.objective.step import StepSettings
    from utils.watch.metrics import Metrics

    args = inputs.args
    text_encoder_layers = accelerator.unwrap_model(model.text_encoder).config.num_hidden_layers
    parts = [LiveSettings(args, accelerator, text_encoder_layers, "text_encoder" in trained)]
    if ema_model is not None:
        parts.append(ema.EMAUpdates(ema_model))
    parts.append(Metrics(args, accelerator, opts, run, inputs.memory_plan))
    if inputs.validation_cfg:
        validator = validation.Validator(inputs.validation_cfg, inputs.validation_sets, StepSettings.from_args(args),
                                         epoch_data.workers, accelerator.process_index, accelerator.num_processes)
        parts.append(validation.ValidationPasses(validator, model, noise_scheduler, accelerator, run))
    parts.append(sampling.SampleImages(inputs.samples, model, accelerator, run, args, ema_model,
                                       tuple(ema.sampled_models(args))))
    if inputs.plugins:
        parts.append(PluginHooks(inputs.plugins, args, accelerator, run, model, noise_scheduler, ema_model))
    parts.append(Checkpointer(args, accelerator, model, opts, run, ema_model))
    return parts


def _reflow(args, model, accelerator, run, saved_state):
    if not args.reflow_steps or saved_state:
        return None
    from utils.run.reflow import Reflow
    return Reflow(args, model, accelerator, run)


def _describe(args, accelerator, epoch_data, plan, settings, trained, text_encoder_training, run) -> None:
    processes, steps_per_epoch = accelerator.num_processes, len(plan)
    for line in data.epoch_plan_summary(plan, epoch_data.global_batch, epoch_data.records).lines():
        log.info("Data: %s", line)
    log.info("Training: %d epochs x %d steps = %d steps; batch %d x grad_accum %d x %d process(es) = %d images "
             "per update", args.max_epochs, steps_per_epoch, args.max_epochs * steps_per_epoch, args.batch_size,
             args.grad_accum, processes, args.batch_size * args.grad_accum * processes)
    for name, s in settings.items():
        if name in trained:
            log.info("Optimizer %s: %s lr %g, %s schedule (warmup %d, decay %d steps)", name, s.optimizer, s.lr,
                     s.lr_scheduler, s.lr_warmup_steps, s.lr_decay_steps)
    if text_encoder_training:
        log.info("Text encoder: %s", text_encoder_training)
    log.info("Device: %s, precision: %s (mixed_precision %s%s). Logs: %s", accelerator.device,
             accelerator.mixed_precision, args.mixed_precision, ", disable_amp" if args.disable_amp else "",
             run.path if run else None)
    if epoch_data.latent_cache:
        log.info("Latent cache: %s (%d entries)", epoch_data.latent_cache.folder, len(epoch_data.latent_cache))
