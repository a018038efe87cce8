"""Fine-tune Stable Diffusion 1.x / 2.x: `python train.py --config cfgs/train.json [--flag value ...]`.

The whole run reads top to bottom: options -> data scan -> model -> run folder -> optimizers -> (reflow) ->
epochs of steps (log, sample, checkpoint) -> final checkpoint. Each concern lives in its own module
(doc/ARCHITECTURE.md).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

import data
from data.batching import process_share
from data.latent_cache import LatentCache
from optimizer.freezing import freeze_text_encoder
from optimizer.optimizers import (TrainingOptimizers, check_optimizers_run_here, read_optimizer_file,
                                  resolve_settings)
from utils.options import config
from utils.watch import ema, sampling, validation
from utils.objective import flow
from utils.run import training_state
from utils.run.checkpoint import EMA_SUFFIX, SaveTimer, checkpoint_name, find_last
from utils.run.interrupts import StopSignals, TrainingDiverged
from utils.run.run_dir import RunDir, setup_console_logging

log = logging.getLogger("train")
PROCESS_WAIT_MINUTES = 30  # how long processes wait for each other before a run counts as hung


def cuda_device(args) -> torch.device:
    """This process's GPU: under torchrun or accelerate launch the launcher's LOCAL_RANK, else gpuid."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", args.gpuid)))


# DistributedDataParallel's settings; together +4% images/s on two H100s over DDP's defaults (doc/PERFORMANCE.md),
# computing the same. Gradients live in DDP's all-reduce buckets instead of being copied there and back. No buffer
# broadcast before every forward: the only buffers (the text encoder's position ids) never change, and the broadcast
# made each forward wait for the slowest process.
DDP_OPTIONS = {"gradient_as_bucket_view": True, "broadcast_buffers": False}


def make_accelerator(args, ddp_options: dict = DDP_OPTIONS):
    """One process of a data-parallel run when started by torchrun / accelerate launch (their environment
    variables say how many and which; NCCL on GPUs, gloo on CPUs), else a single process (doc/MULTI_GPU.md)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        # Read when CUDA starts: segments that grow in place instead of fixed cached blocks keep the memory
        # reserved close to the memory used (part of what fits cfgs/lowvram.json in 10 GiB).
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        # Buckets repeat the same few shapes all run long: finding the fastest convolution once per shape pays.
        torch.backends.cudnn.benchmark = True
        torch.cuda.set_device(cuda_device(args))
    if not use_cuda or args.disable_amp:
        precision = "no"
    else:
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # While the first process samples or writes a checkpoint the others wait at their next exchange; NCCL's
    # default 10 minutes before calling that a hang is short for a big sample set or a slow disk.
    wait = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=PROCESS_WAIT_MINUTES))
    return Accelerator(mixed_precision=precision, cpu=not use_cuda,
                       kwargs_handlers=[wait, DistributedDataParallelKwargs(**ddp_options)])


def dataloader_workers(accelerator) -> int:
    # On CPU the training step needs every core; workers would only fight it for them. A machine's cores are
    # shared by its training processes (LOCAL_WORLD_SIZE, set by torchrun and accelerate launch).
    cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(8, max(1, cores)) if accelerator.device.type == "cuda" else 0


def prepare_models(model, args, accelerator):
    """Moves models to the device, freezes what is not trained and applies the memory/attention options."""
    frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    model.vae.requires_grad_(False).eval().to(accelerator.device, dtype=frozen_dtype)
    trained = {}
    for name, module, frozen in (("unet", model.unet, args.disable_unet_training),
                                 ("text_encoder", model.text_encoder, args.disable_textenc_training)):
        if frozen:
            module.requires_grad_(False).eval().to(accelerator.device, dtype=frozen_dtype)
        else:
            module.train().to(accelerator.device)
            trained[name] = module
    if args.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if "text_encoder" in trained:
            te = model.text_encoder  # transformers 5 renamed the switch; 4.x only has the old name
            getattr(te, "activation_checkpointing_enable", te.gradient_checkpointing_enable)()
    if args.attn_type == "slice":
        model.unet.set_attention_slice("auto")
    elif args.attn_type == "xformers":
        model.unet.enable_xformers_memory_efficient_attention()
    if args.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    if args.compile:
        model.unet.compile()  # in place: the module, its state_dict keys and checkpoints stay as they are
    return trained


def save_checkpoint(model, opts, args, run, name: str, accelerator, ema_model=None, run_state=None) -> Path:
    """A diffusers folder in the run's ckpts/ and (unless no_save_ckpt) a single .safetensors file; with EMA the
    EMA model beside them as `<name>_ema` and `<name>_ema.safetensors`, written first so that a complete
    checkpoint always has its EMA. `run_state` (utils.run.training_state) makes the checkpoint resumable; it brings
    the optimizer state with it."""
    from utils.model.models import save_diffusers, save_single_file

    unet = accelerator.unwrap_model(model.unet)
    text_encoder = accelerator.unwrap_model(model.text_encoder)

    def save(checkpoint: str, optimizer_states=None, state=None) -> Path:
        folder = run.ckpts / checkpoint
        save_diffusers(model, unet, text_encoder, folder, optimizer_states, state)
        log.info("Saved diffusers model: %s%s", folder, " (resumable)" if state is not None else "")
        if not args.no_save_ckpt:
            file = Path(args.save_ckpt_dir or run.ckpts) / f"{checkpoint}.safetensors"
            save_single_file(model, unet, text_encoder, file, args.save_full_precision)
            log.info("Saved single file: %s", file)
        return folder

    if ema_model is not None:
        with ema_model.swapped_in():
            save(name + EMA_SUFFIX)
    return save(name, opts.state_dicts() if args.save_optimizer or run_state is not None else None, run_state)


def freeze_clip_skipped_layers(text_encoder, clip_skip: int) -> None:
    """With clip_skip N >= 2 the text encoder's last N - 1 layers never reach the loss and get no gradient (with one
    process too). Several processes freeze them before DistributedDataParallel wraps the model, so that it does not
    wait for their gradients."""
    parts = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 nests the CLIP parts here
    layers = parts.encoder.layers
    layers[len(layers) + 1 - clip_skip:].requires_grad_(False)


def reload_live_settings(args, accelerator, max_clip_skip: int, text_encoder_trained: bool
                         ) -> tuple[list[str], list[str]]:
    """config.reload_live_settings in the first process, which hands the live options to the others: every process
    trains with the same settings even if the file changes between their reads. With several processes training
    the text encoder, clip_skip keeps its starting value (see freeze_clip_skipped_layers)."""
    from accelerate.utils import broadcast_object_list

    changes, warnings = [], []
    if accelerator.is_main_process:
        clip_skip = args.clip_skip
        changes, warnings = config.reload_live_settings(args, max_clip_skip)
        if accelerator.num_processes > 1 and text_encoder_trained and args.clip_skip != clip_skip:
            changes = [line for line in changes if f": clip_skip {clip_skip} -> " not in line]
            warnings.append(f"clip_skip stays {clip_skip}: with several processes training the text encoder, which "
                            "of its layers train is fixed at the start. Restart from a checkpoint to change it.")
            args.clip_skip = clip_skip
    if accelerator.num_processes > 1:
        live = broadcast_object_list([{key: getattr(args, key) for key in config.LIVE_KEYS}])[0]
        for key, value in live.items():
            setattr(args, key, value)
    return changes, warnings


class StopOrSave:
    """After each step: whether the run stops (a SIGINT or SIGTERM arrived) and whether a timed checkpoint is due.

    One process decides at every step. Several decide together at the end of each gradient accumulation window, so
    that no process holds gradients the others lack and a resumable checkpoint has none pending: a signal to any
    process stops all of them, the first process's timer saves for all. The flags travel over a gloo group on the
    CPU, so nothing waits for the GPU."""

    def __init__(self, stop: StopSignals, save_timer: SaveTimer, accelerator):
        self.stop, self.save_timer = stop, save_timer
        self.main_process = accelerator.is_main_process
        self.group = torch.distributed.new_group(backend="gloo") if accelerator.num_processes > 1 else None

    def after_step(self, window_end: bool) -> tuple[int, bool]:
        """(the number of the signal to stop for, 0 to go on; whether to save a timed checkpoint now)."""
        signum = signal.Signals[self.stop.received].value if self.stop.received else 0
        if self.group is None:
            return signum, self.save_timer.due()
        if not window_end:
            return 0, False
        flags = torch.tensor([signum, self.main_process and self.save_timer.due()], dtype=torch.int64)
        torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MAX, group=self.group)
        return int(flags[0]), bool(flags[1])


def main(argv: list[str] | None = None) -> int:
    setup_console_logging()
    # -- options and data: every user error surfaces here, before a model loads or a folder is made ------------
    try:
        args = config.load(argv)
        flow.check_options(args)
        for note in args.notes:
            log.warning(note)
        resume = find_last(args.logdir, args.project_name) if args.resume_ckpt == "findlast" else \
            Path(args.resume_ckpt)
        saved_state = training_state.load(resume) if resume.is_dir() else None
        ema_resume = ema.check_options(args)
        if saved_state and ema_resume is None and ema.enabled(args) and \
                resume.with_name(resume.name + EMA_SUFFIX).is_dir():
            ema_resume = resume.with_name(resume.name + EMA_SUFFIX)  # the run's own EMA continues with it
        optimizer_file = read_optimizer_file(args.optimizer_config)
        check_optimizers_run_here(optimizer_file, args.optimizer_config,
                                  cuda_device(args) if torch.cuda.is_available() else "cpu")
        scan = data.scan(args.data_root)
        scan.require_images()
        records = data.assign_buckets(scan.records, args.resolution)
        validation_cfg = validation.load_validation_config(args.validation_config) if args.validation_config else None
        if validation_cfg:
            records, validation_sets = validation.split_records(records, validation_cfg, args.resolution)
        samples = sampling.SampleSchedule.from_args(args)
    except (config.ConfigError, data.DataError, FileNotFoundError) as e:
        log.error("error: %s", e)
        return 2
    for line in scan.summary_lines():
        log.warning(line)
    rated = data.RatedDataset(args.max_epochs, args.rated_dataset_target_dropout_percent) if args.rated_dataset else None

    # -- model -------------------------------------------------------------------------------------------------
    from utils.model import models
    from utils.objective.step import StepSettings, encode_text, training_step

    torch.manual_seed(args.seed)
    accelerator = make_accelerator(args)
    if args.reflow_steps and accelerator.num_processes > 1:
        log.error("error: %s: reflow_steps trains on one process only (its generated pairs are not split between "
                  "processes yet); run the reflow phase with plain `python train.py`, then train on %d processes "
                  "from its checkpoint.", args.sources.get("reflow_steps", "defaults"), accelerator.num_processes)
        return 2
    try:
        model = models.load(resume)
        if args.enable_zero_terminal_snr:
            model.use_zero_terminal_snr()
        noise_scheduler = model.noise_scheduler(args.train_sampler)
        flow.configure_model(model, args)
        samples.check_model(model.scheduler.config)
    except (models.ModelLoadError, config.ConfigError, flow.ModelMismatch) as e:
        log.error("error: %s", e)
        return 2
    if args.clip_skip > model.text_encoder.config.num_hidden_layers:
        log.error("error: %s: clip_skip %d reaches past the text encoder's %d layers; use at most %d (0 or 1 = the "
                  "last layer).", args.sources.get("clip_skip", "defaults"), args.clip_skip,
                  model.text_encoder.config.num_hidden_layers, model.text_encoder.config.num_hidden_layers)
        return 2
    trained = prepare_models(model, args, accelerator)
    try:
        text_encoder_training = freeze_text_encoder(trained, optimizer_file.get("text_encoder_freezing"),
                                                    args.optimizer_config)
        # The EMA lives with the first process, which samples and saves it.
        ema_start = ema.load_start(ema_resume, trained) if ema_resume and accelerator.is_main_process else None
    except (config.ConfigError, models.ModelLoadError) as e:
        log.error("error: %s", e)
        return 2
    latent_cache = LatentCache(args.latent_cache_dir or Path(args.logdir) / "latent_cache", model.vae) \
        if args.cache_latents else None

    fingerprint = training_state.fingerprint(args, records, accelerator.num_processes, list(trained))
    if saved_state:
        changed = training_state.differences(saved_state.fingerprint, fingerprint)
        if any(line.startswith("num_processes") for line in changed):
            log.error("error: %s continues a run trained with %s processes; this run has %d. Launch it with %s "
                      "processes to continue exactly, or copy the folder without %s to start a new run from its "
                      "weights.", resume, saved_state.fingerprint["num_processes"], accelerator.num_processes,
                      saved_state.fingerprint["num_processes"], training_state.STATE_FILE)
            return 2
        if changed:
            log.warning("%s holds a resumable run, but %s: starting a new run from its weights and optimizer state "
                        "instead of continuing that one.", resume, "; ".join(changed))
            saved_state = None

    # -- run folder, plan, optimizers ------------------------------------------------------------------------------
    # Data parallel (doc/MULTI_GPU.md): each step's global batch of batch_size x processes images is planned as one
    # and split by slot; the first process alone writes the run folder, logs, samples and checkpoints.
    rank, processes = accelerator.process_index, accelerator.num_processes
    global_batch = args.batch_size * processes
    run = RunDir(args) if accelerator.is_main_process else None
    if run:
        for line in data.report_undersized(records, run.path):
            log.warning(line)
    plan = data.build_epoch_batches(records, global_batch, args.seed, 0, args.grad_accum, rated)
    steps_per_epoch = len(plan)
    settings = resolve_settings(optimizer_file, args, steps_per_epoch, processes)
    if run:
        run.write_json("opt", {name: vars(s) for name, s in settings.items() if name in trained})
    opts = TrainingOptimizers(trained, settings)
    ema_model = None
    if ema.enabled(args) and accelerator.is_main_process:
        ema_model = ema.EMA(trained, ema.resolve_decay(args, steps_per_epoch), args.ema_update_interval,
                            accelerator.device if args.ema_device == "cuda" else torch.device("cpu"), ema_start)
        log.info("EMA: starting from %s.", ema_resume or "the model being trained")
        del ema_start  # the EMA holds its own copy now
    sampled_models = ema.sampled_models(args)
    resumed_states = models.load_optimizer_states(resume) if resume.is_dir() else {}
    if resumed_states:
        try:
            opts.load_state_dicts(resumed_states)
            log.info("Loaded optimizer state from %s", resume)
        except ValueError as e:  # e.g. saved with the text encoder frozen, now trained: start the optimizer afresh
            log.warning("Optimizer state in %s does not fit this run (%s); starting with a fresh optimizer.", resume, e)
    log.info("Model: %s", model.describe())  # before DistributedDataParallel wraps the trained models
    if processes > 1 and "text_encoder" in trained and args.clip_skip >= 2:
        freeze_clip_skipped_layers(model.text_encoder, args.clip_skip)
    for name, module in trained.items():
        setattr(model, name, accelerator.prepare(module))
    scaler = accelerator.scaler
    if saved_state:
        for name, schedule in opts.schedules.items():
            schedule.load_state_dict(saved_state.schedules[name])
        if scaler is not None and saved_state.scaler is not None:
            scaler.load_state_dict(saved_state.scaler)
        if ema_model is not None:
            ema_model.optimizer_updates = saved_state.ema_updates
        training_state.restore_gradients(trained, saved_state.pending_grads)
        log.info("Resuming the run of %s at epoch %d, step %d of it (global step %d).", resume,
                 saved_state.epoch, saved_state.step_in_epoch, saved_state.global_step)

    effective_batch = args.batch_size * args.grad_accum * accelerator.num_processes
    for line in data.epoch_plan_summary(plan, global_batch, records).lines():
        log.info("Data: %s", line)
    log.info("Training: %d epochs x %d steps = %d steps; batch %d x grad_accum %d x %d process(es) = %d images "
             "per update", args.max_epochs, steps_per_epoch, args.max_epochs * steps_per_epoch, args.batch_size,
             args.grad_accum, accelerator.num_processes, effective_batch)
    for name, s in settings.items():
        if name in trained:
            log.info("Optimizer %s: %s lr %g, %s schedule (warmup %d, decay %d steps)", name, s.optimizer, s.lr,
                     s.lr_scheduler, s.lr_warmup_steps, s.lr_decay_steps)
    if text_encoder_training:
        log.info("Text encoder: %s", text_encoder_training)
    log.info("Device: %s, precision: %s. Logs: %s", accelerator.device, accelerator.mixed_precision,
             run.path if run else None)
    if latent_cache:
        log.info("Latent cache: %s (%d entries)", latent_cache.folder, len(latent_cache))

    # -- the loop ----------------------------------------------------------------------------------------------
    step_settings = StepSettings.from_args(args)
    loader_workers = dataloader_workers(accelerator)
    save_timer = SaveTimer(args.ckpt_every_n_minutes)
    validator = validation.Validator(validation_cfg, validation_sets, step_settings, loader_workers, rank,
                                     processes) if validation_cfg else None

    def validate(step: int) -> None:
        validator.run(accelerator.unwrap_model(model.unet), accelerator.unwrap_model(model.text_encoder), model.vae,
                      noise_scheduler, model.tokenizer, step, run.tb if run else None, accelerator.autocast)

    def sample(step: int, captions: list[str]) -> None:
        if run is None:  # the first process samples for all
            return
        event = samples.prepare(step, captions)  # one event: every sampled model gets the same prompts and seeds
        for label in sampled_models:
            with ema_model.swapped_in() if label == "ema" else contextlib.nullcontext():
                sampling.generate_samples(model, accelerator.unwrap_model(model.unet),
                                          accelerator.unwrap_model(model.text_encoder), event, step=step,
                                          out_dir=run.samples, tb_writer=run.tb, autocast=accelerator.autocast,
                                          clip_skip=args.clip_skip, label=label)

    def epoch_loader(plan, epoch: int, start_step: int = 0, cache: LatentCache | None = latent_cache):
        return data.make_epoch_loader(plan, records, model.tokenizer, cond_dropout=args.cond_dropout, seed=args.seed,
                                      epoch=epoch, num_workers=loader_workers,
                                      pin_memory=accelerator.device.type == "cuda", flip_p=args.flip_p,
                                      shuffle_tags=args.shuffle_tags, keep_tags=args.keep_tags, skipped=scan.skipped,
                                      start_step=start_step, latent_cache=cache)
    global_step, epoch, start_epoch, start_step = 0, 0, 0, 0
    last_log_time, images_since_log = time.perf_counter(), 0
    loss_since_log, steps_since_log = torch.zeros((), device=accelerator.device), 0
    epoch_loss = torch.zeros((), device=accelerator.device)
    epoch_losses: list[float] = []
    skipped_updates, skipped_in_a_row = 0, 0
    if saved_state:
        start_epoch, start_step, global_step = saved_state.epoch, saved_state.step_in_epoch, saved_state.global_step
        epoch_loss += saved_state.epoch_loss_sum
        loss_since_log += saved_state.loss_since_log_sum
        steps_since_log, epoch_losses = saved_state.steps_since_log, list(saved_state.epoch_losses)
        skipped_updates = saved_state.skipped_updates
        if validator and saved_state.validation:
            validator.history, validator.first = saved_state.validation["history"], saved_state.validation["first"]

    def train_step(batch: dict, local_step: int, steps_in_epoch: int, bar) -> torch.Tensor:
        """One batch: forward, backward, an optimizer update at the end of its gradient-accumulation window, the
        LR schedules and the log_step scalars. The main epochs and reflow's training phase both train with it.
        Returns the batch's loss."""
        nonlocal global_step, last_log_time, images_since_log, steps_since_log, skipped_updates, skipped_in_a_row
        # Gradient accumulation windows are aligned to the epoch; the last one may be shorter.
        window_start = local_step - local_step % args.grad_accum
        window = min(args.grad_accum, steps_in_epoch - window_start)
        updates_now = local_step == window_start + window - 1
        log_now = (global_step + 1) % args.log_step == 0

        loss, grad_norms, updated = training_step(model, noise_scheduler, batch, step_settings, accelerator, opts,
                                                  window=window, update=updates_now,
                                                  clip_grad_norm=args.clip_grad_norm)
        if updates_now:
            if updated:
                skipped_in_a_row = 0
                if ema_model is not None:
                    ema_model.step()
            else:
                skipped_updates, skipped_in_a_row = skipped_updates + 1, skipped_in_a_row + 1
                # fp16's grad scaler overflows now and then by design; anywhere else a skip deserves attention.
                log.log(logging.INFO if scaler is not None else logging.WARNING, "Step %d: gradients not finite; "
                        "update skipped (%d in a row).", global_step + 1, skipped_in_a_row)
                if skipped_in_a_row >= args.max_skipped_updates:
                    raise TrainingDiverged(global_step + 1, skipped_in_a_row)

        global_step += 1
        images_since_log += batch["input_ids"].shape[0] * processes
        loss_since_log.add_(loss)
        steps_since_log += 1
        if log_now:
            elapsed = time.perf_counter() - last_log_time
            mean_loss = (accelerator.reduce(loss_since_log, "mean") / steps_since_log).item()
            if run:
                lrs = opts.current_lrs()
                run.tb.add_scalar("loss/log_step", mean_loss, global_step)
                run.tb.add_scalar("hyperparameter/lr unet", lrs.get("unet", 0.0), global_step)
                run.tb.add_scalar("hyperparameter/lr text encoder", lrs.get("text_encoder", 0.0), global_step)
                run.tb.add_scalar("performance/images per second", images_since_log / elapsed, global_step)
                run.tb.add_scalar("optimizer/skipped_updates", skipped_updates, global_step)
                if scaler is not None:
                    run.tb.add_scalar("hyperparameter/grad scale", scaler.get_scale(), global_step)
                if torch.cuda.is_available():
                    run.tb.add_scalar("performance/vram", torch.cuda.max_memory_allocated() / 2**20, global_step)
                for name, norm in grad_norms.items():
                    run.tb.add_scalar(f"optimizer/{'te' if name == 'text_encoder' else name}_grad_norm",
                                      norm.item(), global_step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lrs.get('unet', lrs.get('text_encoder')):.2e}",
                                img_s=f"{images_since_log / elapsed:.1f}")
            last_log_time, images_since_log = time.perf_counter(), 0
            loss_since_log.zero_()
            steps_since_log = 0
        return loss

    def run_state(next_epoch: int, next_step: int) -> training_state.TrainingState:
        """Where the run stands after its last step: everything needed to continue exactly from there. Every process
        calls it at the same step: the loss sums are averaged over the processes."""
        return training_state.TrainingState(
            epoch=next_epoch, step_in_epoch=next_step, global_step=global_step, fingerprint=fingerprint,
            rng=training_state.capture_rng(), schedules={name: s.state_dict() for name, s in opts.schedules.items()},
            scaler=scaler.state_dict() if scaler is not None else None,
            pending_grads=training_state.pending_gradients(trained),
            epoch_loss_sum=float(accelerator.reduce(epoch_loss, "mean")),
            loss_since_log_sum=float(accelerator.reduce(loss_since_log, "mean")), steps_since_log=steps_since_log,
            epoch_losses=list(epoch_losses),
            validation={"history": validator.history, "first": validator.first} if validator else {},
            ema_updates=ema_model.optimizer_updates if ema_model is not None else 0, skipped_updates=skipped_updates)

    def save(name: str, next_epoch: int, next_step: int, resumable: bool) -> Path | None:
        """A checkpoint; a resumable one also holds the run's state at (next_epoch, next_step). A save that
        cannot be written (a full disk) leaves nothing behind, is reported, and training goes on. Of several
        processes, the first writes (they all hold the same weights); the others return None."""
        state = run_state(next_epoch, next_step) if resumable else None
        if run is None:
            return None
        try:
            return save_checkpoint(model, opts, args, run, name, accelerator, ema_model, state)
        except (OSError, SafetensorError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "writ" not in str(e):  # torch.save's I/O failures are RuntimeErrors
                raise
            log.error("Could not save checkpoint %s: %s. Nothing of it is left behind and earlier checkpoints are "
                      "untouched. Free space in %s; the next save tries again.", name, e, run.ckpts)
            return None

    training_start = time.perf_counter()
    with StopSignals() as stop:
        try:
            if saved_state:
                training_state.restore_rng(saved_state.rng)
            else:
                if validator:
                    validate(0)
                if samples.pretrain_due and run:
                    sample(0, next(iter(epoch_loader(plan, 0)))["captions"])

            # -- reflow (doc/RECTIFIED_FLOW.md): the model's own ODE pairs (noise -> its sample) retrain it straighter
            if args.reflow_steps and not saved_state:
                unet, text_encoder = accelerator.unwrap_model(model.unet), accelerator.unwrap_model(model.text_encoder)

                def embed(input_ids: torch.Tensor) -> torch.Tensor:
                    return encode_text(text_encoder, input_ids, args.clip_skip)
                # (without the latent cache: prompt_batches reads the batch shape from its pixels)
                prompts = flow.prompt_batches(epoch_loader(plan, 0, cache=None), args.reflow_gen_batches,
                                              model.vae.config)
                ode_steps = flow.reflow_sample_steps(args)
                # Straightness is measured on the same noise and captions every time, so the values compare.
                probe_noise = torch.randn(prompts[0].latent_shape, generator=torch.Generator().manual_seed(args.seed))
                pairs_generator, shuffle_generator = (torch.Generator().manual_seed(args.seed + n) for n in (1, 2))
                log.info("Reflow: %d iteration(s) of %d generated pairs (%d-step ODE), %d epoch(s) each",
                         args.reflow_steps, sum(p.latent_shape[0] for p in prompts), ode_steps,
                         args.reflow_train_epochs)

                def measure_flow() -> None:
                    with flow.eval_mode(unet, text_encoder), accelerator.autocast():
                        measures = flow.measure(unet, embed(prompts[0].input_ids), probe_noise.to(unet.device),
                                                ode_steps, model.scheduler.config)
                    run.tb.add_scalar("reflow/straightness", measures.straightness, global_step)
                    run.tb.add_scalar("reflow/one_step_error", measures.one_step_error, global_step)
                    log.info("Reflow at step %d: straightness %.5f, one-step error %.5f", global_step,
                             measures.straightness, measures.one_step_error)
                measure_flow()
                for iteration in range(args.reflow_steps):
                    pairs = flow.new_pairs_store(prompts, run.path)
                    try:
                        with flow.eval_mode(unet, text_encoder):
                            flow.generate_pairs(unet, embed, prompts, ode_steps, model.scheduler.config,
                                                pairs_generator, pairs, accelerator.autocast,
                                                f"reflow {iteration + 1}/{args.reflow_steps}: generating")
                        for reflow_epoch in range(args.reflow_train_epochs):
                            order = pairs.epoch(args.batch_size, shuffle_generator)
                            steps_bar = tqdm(order, desc=f"reflow {iteration + 1}/{args.reflow_steps} epoch "
                                             f"{reflow_epoch + 1}/{args.reflow_train_epochs}", unit="step",
                                             leave=False, dynamic_ncols=True)
                            reflow_loss = torch.zeros((), device=accelerator.device)
                            for local_step, rows in enumerate(steps_bar):
                                batch = pairs.batch(rows)
                                reflow_loss += train_step(batch, local_step, len(order), steps_bar)
                                if samples.due(global_step):
                                    sample(global_step, batch["captions"])
                                if stop.received:  # reflow is not resumable: the checkpoint holds its weights
                                    save(f"interrupted-gs{global_step}", 0, 0, resumable=False)
                                    run.close()
                                    return stop.exit_code
                                if save_timer.due():
                                    save(checkpoint_name(args.project_name, 0, global_step), 0, 0, resumable=False)
                            run.tb.add_scalar("loss/reflow_epoch", (reflow_loss / len(order)).item(), global_step)
                    finally:
                        pairs.discard()
                    measure_flow()
                    if validator:
                        validate(global_step)

            epochs_bar = tqdm(range(start_epoch, args.max_epochs), desc="epochs", unit="ep", dynamic_ncols=True,
                              initial=start_epoch, total=args.max_epochs, disable=not accelerator.is_main_process)
            stop_or_save = StopOrSave(stop, save_timer, accelerator)
            for epoch in epochs_bar:
                epoch_start = time.perf_counter()
                if args.load_settings_every_epoch and args.config:
                    changes, warnings = reload_live_settings(
                        args, accelerator, accelerator.unwrap_model(model.text_encoder).config.num_hidden_layers,
                        "text_encoder" in trained)
                    for line in changes:
                        log.info("Epoch %d: settings changed: %s", epoch, line)
                    for line in warnings:
                        log.warning("Epoch %d: %s", epoch, line)
                    step_settings = StepSettings.from_args(args)
                if epoch > 0:
                    plan = data.build_epoch_batches(records, global_batch, args.seed, epoch, args.grad_accum, rated)
                first_step = start_step if epoch == start_epoch else 0
                loader = epoch_loader(process_share(plan, rank, processes), epoch, first_step)
                if args.write_schedule and run:  # the whole plan: every process's slots
                    data.write_schedule(run.path / f"ep{epoch}_batch_schedule.txt", epoch_loader(plan, epoch).dataset)
                steps_bar = tqdm(loader, desc=f"epoch {epoch}", unit="step", leave=False, dynamic_ncols=True,
                                 initial=first_step, total=len(plan), disable=not accelerator.is_main_process)
                for local_step, batch in enumerate(steps_bar, start=first_step):
                    epoch_loss += train_step(batch, local_step, len(plan), steps_bar)
                    if samples.due(global_step):
                        sample(global_step, batch["captions"])
                    if validator and validator.due(epoch, local_step, len(plan)):
                        validate(global_step)
                    window_end = (local_step + 1) % args.grad_accum == 0 or local_step + 1 == len(plan)
                    stop_signal, save_due = stop_or_save.after_step(window_end)
                    if stop_signal:
                        save(f"interrupted-gs{global_step}", epoch, local_step + 1, resumable=True)
                        if run:
                            run.close()
                        return 128 + stop_signal  # the shell's convention
                    if save_due:
                        save(checkpoint_name(args.project_name, epoch, global_step), epoch, local_step + 1,
                             resumable=args.save_optimizer)

                epoch_mean = (accelerator.reduce(epoch_loss, "mean") / max(1, len(plan))).item()
                epoch_losses.append(epoch_mean)
                epoch_loss.zero_()
                if run:
                    run.tb.add_scalar("loss/epoch", epoch_mean, global_step)
                    run.tb.add_scalar("performance/minutes per epoch", (time.perf_counter() - epoch_start) / 60,
                                      global_step)
                epochs_bar.set_postfix(loss=f"{epoch_mean:.4f}")
                done = epoch + 1
                if args.save_every_n_epochs and done % args.save_every_n_epochs == 0 and \
                        done >= args.save_ckpts_from_n_epochs and done < args.max_epochs:
                    save(checkpoint_name(args.project_name, done, global_step), done, 0, resumable=args.save_optimizer)
        except KeyboardInterrupt:
            log.warning("Stopped at once, without saving.")
            if run:
                run.close()
            return 130
        except TrainingDiverged as e:
            folder = save(checkpoint_name(args.project_name, epoch, global_step, prefix="errored-"), 0, 0,
                          resumable=False)
            if run:  # every process diverges at the same step; the first reports it
                log.error("error: %s The weights before those updates are saved in %s.", e, folder or "(nothing: the "
                          "save failed)")
                run.close()
            return 3
        except Exception:
            if global_step:
                log.exception("Training failed at step %d; saving what was trained as errored-.", global_step)
                save(checkpoint_name(args.project_name, epoch, global_step, prefix="errored-"), 0, 0, resumable=False)
            if run:
                run.close()
            raise

    final = save(checkpoint_name(args.project_name, args.max_epochs, global_step,
                                 prefix="" if args.no_prepend_last else "last-"), args.max_epochs, 0,
                 resumable=args.save_optimizer)
    if run is None:
        accelerator.wait_for_everyone()  # the processes leave their process group together
        accelerator.end_training()
        return 0
    if final is None:
        log.error("error: training finished but its final checkpoint could not be saved (see above).")
        run.close()
        return 1
    minutes = (time.perf_counter() - training_start) / 60
    log.info("Done: %d steps in %.1f min. Epoch loss %.4f -> %.4f. Final model: %s. TensorBoard: tensorboard "
             "--logdir %s", global_step, minutes, epoch_losses[0], epoch_losses[-1], final, args.logdir)
    run.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
