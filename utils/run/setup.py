"""Devices and models made ready to train: the accelerator (one process, or one of a data-parallel run), the data
loader's worker count, and the models moved, frozen and switched to the memory and attention options. train.py and
scripts/bench.py both set up through these."""
from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.model.norms import keep_norms_in_bf16
from utils.options.config import ConfigError

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
    precision = choose_precision(args.mixed_precision, args.disable_amp, use_cuda,
                                 use_cuda and torch.cuda.is_bf16_supported(),
                                 torch.cuda.get_device_name() if use_cuda else "",
                                 args.sources.get("mixed_precision", "defaults"))
    # While the first process samples or writes a checkpoint the others wait at their next exchange; NCCL's
    # default 10 minutes before calling that a hang is short for a big sample set or a slow disk.
    wait = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=PROCESS_WAIT_MINUTES))
    return Accelerator(mixed_precision=precision, cpu=not use_cuda,
                       kwargs_handlers=[wait, DistributedDataParallelKwargs(**ddp_options)])


def choose_precision(setting: str, disable_amp: bool, cuda: bool, bf16_supported: bool, gpu_name: str = "",
                     where: str = "defaults") -> str:
    """accelerate's mixed precision ("bf16", "fp16" or "no") for the `mixed_precision` option on this device.

    auto: none on the CPU or with disable_amp, else bf16 where the GPU supports it, else fp16 (with a grad scaler).
    An explicit bf16 or fp16 that the device cannot run is a ConfigError naming the fix."""
    if setting == "auto":
        return "no" if not cuda or disable_amp else "bf16" if bf16_supported else "fp16"
    if setting == "no" or disable_amp:
        return "no"
    if not cuda:
        raise ConfigError(f"{where}: mixed_precision '{setting}' needs a CUDA GPU, and PyTorch sees none: on the CPU "
                          "training runs in full precision. Set mixed_precision to 'auto' or 'no'.")
    if setting == "bf16" and not bf16_supported:
        raise ConfigError(f"{where}: mixed_precision 'bf16', but this GPU ({gpu_name or 'cuda'}) does not support "
                          "bf16 (it needs an NVIDIA Ampere or newer GPU, e.g. RTX 30xx, A100). Use 'fp16' or 'auto'.")
    return setting


@dataclass(frozen=True)
class NvidiaGpu:
    """What the NVIDIA driver says about this machine's GPUs."""
    names: tuple[str, ...] = ()  # from `nvidia-smi -L`; empty when only the driver was seen
    driver_cuda: str | None = None  # the newest CUDA version the driver supports ("12.4"), from `nvidia-smi`


# download.pytorch.org's CUDA builds of torch (a driver runs any build for its CUDA version or older).
CUDA_WHEELS = ((11, 8), (12, 1), (12, 4), (12, 6), (12, 8), (12, 9), (13, 0))
# Where the NVIDIA driver announces itself on Linux; WSL's nvidia-smi is outside the PATH.
NVIDIA_PROC_VERSION = Path("/proc/driver/nvidia/version")
WSL_NVIDIA_SMI = Path("/usr/lib/wsl/lib/nvidia-smi")


def find_nvidia_gpu(nvidia_smi: str | None = None, proc_version: Path = NVIDIA_PROC_VERSION) -> NvidiaGpu | None:
    """The machine's NVIDIA GPU as its driver reports it (nvidia-smi, or the Linux driver's /proc entry), whether
    or not PyTorch can use it; None when there is no NVIDIA driver. `nvidia_smi`: the program (default: the one on
    the PATH, or WSL's)."""
    if nvidia_smi is None:
        nvidia_smi = shutil.which("nvidia-smi") or (str(WSL_NVIDIA_SMI) if WSL_NVIDIA_SMI.is_file() else None)
    if nvidia_smi:
        try:
            listing = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=20)
            names = tuple(m.group(1) for m in re.finditer(r"GPU \d+: (.+?)(?: \(UUID|$)", listing.stdout, re.M))
            if listing.returncode == 0 and names:
                header = subprocess.run([nvidia_smi], capture_output=True, text=True, timeout=20).stdout
                version = re.search(r"CUDA Version: (\d+\.\d+)", header)
                return NvidiaGpu(names, version.group(1) if version else None)
        except (OSError, subprocess.SubprocessError):
            pass
    return NvidiaGpu() if proc_version.is_file() else None


def unusable_gpu(gpu: NvidiaGpu | None, cuda_available: bool, torch_version: str, torch_cuda: str | None,
                 visible_devices: str | None = None) -> str | None:
    """What is wrong when this machine has an NVIDIA GPU but PyTorch cannot use it (a CPU-only build of torch, or a
    driver older than torch's CUDA), with the fix; None when there is nothing to say: no NVIDIA GPU, a usable one,
    or CUDA_VISIBLE_DEVICES set to hide them all (the user's choice)."""
    if gpu is None or cuda_available or visible_devices is not None and visible_devices.strip() in ("", "-1"):
        return None
    which = f" ({', '.join(gpu.names)})" if gpu.names else ""
    if torch_cuda is None:
        wheel = _cuda_wheel(gpu.driver_cuda)
        return (f"This machine has an NVIDIA GPU{which}, but the installed PyTorch {torch_version} is a CPU-only build "
                f"(torch.version.cuda is None), so training would run on the CPU, many times slower. Install a CUDA "
                f"build of torch: `python -m pip install --force-reinstall torch --index-url "
                f"https://download.pytorch.org/whl/{wheel}`"
                + (f" (the driver supports CUDA up to {gpu.driver_cuda})" if gpu.driver_cuda else "")
                + "; other systems and CUDA versions: https://pytorch.org/get-started/locally/.")
    older = gpu.driver_cuda and _version(gpu.driver_cuda) < _version(torch_cuda)
    build_it_runs = older and _version(gpu.driver_cuda) >= CUDA_WHEELS[0]
    reason = (f"the NVIDIA driver supports CUDA up to {gpu.driver_cuda}, older than torch's CUDA {torch_cuda}: update "
              "the driver" + (", or install the torch build for your driver: `python -m pip install "
                              "--force-reinstall torch --index-url "
                              f"https://download.pytorch.org/whl/{_cuda_wheel(gpu.driver_cuda)}`" if build_it_runs
                              else " (no current torch build runs on it)")
              if older else "`python -c \"import torch; torch.cuda.init()\"` says why (often a driver older than "
              "torch's CUDA, or CUDA_VISIBLE_DEVICES)")
    return (f"This machine has an NVIDIA GPU{which}, but PyTorch {torch_version} (built for CUDA {torch_cuda}) cannot "
            f"use it, so training would run on the CPU, many times slower: {reason}.")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def _cuda_wheel(driver_cuda: str | None) -> str:
    """The newest download.pytorch.org CUDA build index the driver runs (cu124 when the driver did not say)."""
    fitting = [v for v in CUDA_WHEELS if driver_cuda is None and v == (12, 4) or
               driver_cuda is not None and v <= _version(driver_cuda)]
    major, minor = fitting[-1] if fitting else CUDA_WHEELS[0]
    return f"cu{major}{minor}"


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
            module.train().to(accelerator.device, dtype=torch.bfloat16 if args.bf16_weights else None)
            trained[name] = module
    if args.vram != "off" and accelerator.device.type == "cuda":  # a memory plan: the VAE encodes and decodes one
        model.vae.enable_slicing()                                 # image at a time (no spike of the whole batch)
    if args.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    elif args.partial_checkpointing or args.attention_checkpointing:
        checkpoint_highest_resolution(model.unet, attention_only=not args.partial_checkpointing)
    if "text_encoder" in trained and (args.gradient_checkpointing or args.partial_checkpointing or
                                      args.attention_checkpointing):
        # Its layers keep 48 bytes per token x width each (0.26 GiB for SD1.5's at batch 8) for 2% of a step's work.
        te = model.text_encoder  # transformers 5 renamed the switch; 4.x only has the old name
        getattr(te, "activation_checkpointing_enable", te.gradient_checkpointing_enable)()
    if args.attn_type == "slice":
        model.unet.set_attention_slice("auto")
    elif args.attn_type == "xformers":
        model.unet.enable_xformers_memory_efficient_attention()
    if args.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    keep_norms_in_bf16(model.unet)
    if args.compile:
        compile_models(model.unet, model.text_encoder)
    return trained


def checkpoint_highest_resolution(unet, attention_only: bool = False) -> None:
    """Gradient checkpointing in the UNet's first down block and last up block only: at the latents' full size they
    keep the most activations per computation (their attention runs over every latent pixel). `attention_only`: in
    their transformer blocks alone, which keep 4 times the bytes per recomputed FLOP of their ResNet blocks."""
    unet.enable_gradient_checkpointing()
    top = (unet.down_blocks[0], unet.up_blocks[-1])
    kept = {id(m) for block in top for m in (block.attentions if attention_only else block).modules()}
    for module in unet.modules():
        if hasattr(module, "gradient_checkpointing") and id(module) not in kept:
            module.gradient_checkpointing = False


def compile_models(unet, text_encoder) -> None:
    """torch.compile in place (the modules, their state_dict keys and checkpoints stay as they are). Compiled kernels
    go to a cache on disk that later runs reuse (TORCHINDUCTOR_CACHE_DIR, if not set: ~/.cache/sdtrainer/
    torchinductor, which outlives a reboot, unlike torch's own default under /tmp).

    The text encoder too, trained or not: it is 2% of a step's work, but uncompiled its small kernels are queued one
    by one while the GPU waits (4.6 against 9.0 ms of a 386 ms SD1.5 step at batch 48, 2% more images/s, run P of
    doc/PERFORMANCE.md).

    Each input size is compiled for itself (dynamic=False): by default torch compiles the UNet for any size once a
    second size appears, and that compile fails in torch's inductor (torch 2.13 on the CPU at a run's second aspect
    bucket; torch 2.11 on CUDA in run O), which stopped the run."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdtrainer" / "torchinductor"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    # Under mixed precision both modules' forwards run through accelerate's autocast wrapper, one function to torch,
    # so they share its limit of compiled versions per function (8, then it runs uncompiled): twice that, 8 each.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    unet.compile(dynamic=False)
    text_encoder.compile(dynamic=False)


def freeze_clip_skipped_layers(text_encoder, clip_skip: int) -> None:
    """With clip_skip N >= 2 the text encoder's last N - 1 layers never reach the loss and get no gradient (with one
    process too). Several processes freeze them before DistributedDataParallel wraps the model, so that it does not
    wait for their gradients."""
    parts = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 nests the CLIP parts here
    layers = parts.encoder.layers
    layers[len(layers) + 1 - clip_skip:].requires_grad_(False)
