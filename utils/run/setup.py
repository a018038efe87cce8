"""Devices and models made ready to train: the accelerator (one process, or one of a data-parallel run), the data
loader's worker count, and the models moved, frozen and switched to the memory and attention options. train.py and
scripts/bench.py both set up through these."""
from __future__ import annotations

import datetime
import os

import torch

PROCESS_WAIT_MINUTES = 30  # how long processes wait for each other before a run counts as hung

# DistributedDataParallel's settings; together +4% images/s on two H100s over DDP's defaults (doc/PERFORMANCE.md),
# computing the same. Gradients live in DDP's all-reduce buckets instead of being copied there and back. No buffer
# broadcast before every forward: the only buffers (the text encoder's position ids) never change, and the broadcast
# made each forward wait for the slowest process.
DDP_OPTIONS = {"gradient_as_bucket_view": True, "broadcast_buffers": False}


def cuda_device(args) -> torch.device:
    """This process's GPU: under torchrun or accelerate launch the launcher's LOCAL_RANK, else gpuid."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", args.gpuid)))


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


def prepare_models(model, args, accelerator) -> dict[str, torch.nn.Module]:
    """Moves models to the device, freezes what is not trained and applies the memory/attention options.
    Returns the trained models by name ("unet", "text_encoder")."""
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


def freeze_clip_skipped_layers(text_encoder, clip_skip: int) -> None:
    """With clip_skip N >= 2 the text encoder's last N - 1 layers never reach the loss and get no gradient (with one
    process too). Several processes freeze them before DistributedDataParallel wraps the model, so that it does not
    wait for their gradients."""
    parts = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 nests the CLIP parts here
    layers = parts.encoder.layers
    layers[len(layers) + 1 - clip_skip:].requires_grad_(False)
