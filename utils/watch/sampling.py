"""Sample images during training, so users can watch the model learn (doc/SAMPLES.md is the user's page).

Three parts:
- the sample file (`sample_prompts`: a `.txt`, one prompt per line, or a `.json` with every setting) read
  into `SampleSettings`; `SampleSchedule` checks it at startup (bad content stops the run before a model
  loads) and re-reads it before every sampling event, keeping the previous settings when an edit is invalid;
- `make_sampler`: the diffusers scheduler for a sampler name, built from the model's own scheduler config;
- `generate_samples`: renders one event with the live modules (no copy, training dtype, autocast), writes
  the labelled strips and their prompt files, and logs one TensorBoard image per prompt. Prompts are encoded
  with Compel's weighting syntax (`SamplePromptEncoder`), checked when the sample file is read.

Sampling runs with torch's random state forked, and random seeds come from the OS, so training after a
sample draws exactly what it would have drawn without it. diffusers is imported only where images are made, so
checking the sample file at startup stays instant.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from compel import Compel
from PIL import Image, ImageDraw, ImageFont

from data.buckets import buckets_for
from data.loader import token_ids
from utils.objective import flow
from utils.options.config import ConfigError, read_json_object
from utils.options.values import boolean, did_you_mean, integer, is_number, string, unknown_key
from utils.objective.step import encode_text

log = logging.getLogger(__name__)

# Lin et al. 2023 §3.4: classifier-free guidance rescaled against the overexposure zero-terminal-SNR models show
# at high guidance; 0.7 as the paper and EveryDream2 use.
ZERO_SNR_GUIDANCE_RESCALE = 0.7
# Random-caption mode renders at most this many captions of the current batch.
RANDOM_CAPTION_REQUESTS = 4


@dataclass(frozen=True)
class SamplerSpec:
    scheduler_class: str  # a diffusers scheduler class name
    options: dict = field(default_factory=dict)  # passed to from_config on top of the model's scheduler config


_DPM = {"algorithm_type": "dpmsolver++"}
_DPM_SDE = {"algorithm_type": "sde-dpmsolver++"}
_KARRAS = {"use_karras_sigmas": True}
# diffusers would switch this on itself (with a warning) for the singlestep solver's final zero sigma.
_SINGLESTEP = {**_DPM, "lower_order_final": True}

SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec("DDIMScheduler"),
    # PRK warm-up steps need many inference steps and SD models ship with them skipped.
    "pndm": SamplerSpec("PNDMScheduler", {"skip_prk_steps": True}),
    "ddpm": SamplerSpec("DDPMScheduler"),
    "lms": SamplerSpec("LMSDiscreteScheduler"),  # its coefficients are integrals taken with scipy
    "euler": SamplerSpec("EulerDiscreteScheduler"),
    "euler_a": SamplerSpec("EulerAncestralDiscreteScheduler"),
    "kdpm2": SamplerSpec("KDPM2AncestralDiscreteScheduler"),
    "dpm++": SamplerSpec("DPMSolverMultistepScheduler", _DPM),
    "dpm++_2m": SamplerSpec("DPMSolverMultistepScheduler", _DPM),
    "dpm++_2m_k": SamplerSpec("DPMSolverMultistepScheduler", {**_DPM, **_KARRAS}),
    "dpm++_2s": SamplerSpec("DPMSolverSinglestepScheduler", _SINGLESTEP),
    "dpm++_2s_k": SamplerSpec("DPMSolverSinglestepScheduler", {**_SINGLESTEP, **_KARRAS}),
    # Its Brownian-tree noise (torchsde) ignores the per-prompt generators; a fixed noise seed keeps samples
    # repeatable.
    "dpm++_sde": SamplerSpec("DPMSolverSDEScheduler", {"noise_sampler_seed": 0}),
    "dpm++_sde_k": SamplerSpec("DPMSolverSDEScheduler", {"noise_sampler_seed": 0, **_KARRAS}),
    "dpm++_2m_sde": SamplerSpec("DPMSolverMultistepScheduler", _DPM_SDE),
    "dpm++_2m_sde_k": SamplerSpec("DPMSolverMultistepScheduler", {**_DPM_SDE, **_KARRAS}),
    # Rectified-flow models predict the velocity from noise to image; first order = plain Euler steps in sigma.
    "flow": SamplerSpec("DPMSolverMultistepScheduler", flow.FLOW_SAMPLER_OPTIONS),
}


def check_sampler_name(name: str, where: str) -> None:
    """A ConfigError for a name that is not in SAMPLERS."""
    if name not in SAMPLERS:
        raise ConfigError(f"{where}: key 'scheduler' is '{name}', which is not a sampler here."
                          f"{did_you_mean(name, SAMPLERS)} Choose one of: {', '.join(SAMPLERS)}.")


def _accepts(scheduler_class, option: str) -> bool:
    return option in inspect.signature(scheduler_class.__init__).parameters


def sampler_for(name: str, scheduler_config) -> str:
    """The sampler a model is rendered with: the chosen one, except that a rectified-flow model can only be
    sampled with the flow ODE solver it was trained for."""
    return "flow" if flow.is_flow_model(scheduler_config) else name


def make_sampler(name: str, scheduler_config):
    """The diffusers scheduler `name` (a key of SAMPLERS) for a model whose scheduler config is given.

    The model's betas, prediction type and timestep spacing carry over. A zero-terminal-SNR schedule
    (`rescale_betas_zero_snr`) that the sampler class cannot follow is a ConfigError: from_config would drop it
    without a word and sample with the wrong noise levels.
    """
    import diffusers

    check_sampler_name(name, "sampler")
    spec = SAMPLERS[name]
    scheduler_class = getattr(diffusers, spec.scheduler_class)
    if scheduler_config.get("rescale_betas_zero_snr") and not _accepts(scheduler_class, "rescale_betas_zero_snr"):
        raise ConfigError(f"scheduler '{name}' ({spec.scheduler_class}) cannot sample a zero-terminal-SNR model "
                          "(enable_zero_terminal_snr, or a model saved with it). Use ddim, ddpm, euler, euler_a or "
                          "a dpm++_2m variant.")
    return scheduler_class.from_config(scheduler_config, **spec.options)


# -- the sample file ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    seed: int  # -1: a fresh random seed at every event
    size: tuple[int, int]  # width, height
    negative_prompt: str = ""
    random_caption: bool = False  # the prompt is taken from the current training batch
    cfgs: tuple[float, ...] | None = None  # this sample's guidance scales; None = the event's `cfgs`


@dataclass(frozen=True)
class RenderedSample:
    """One image of a sample event as the model drew it (no label, not yet in a strip)."""
    prompt: str
    seed: int
    cfg: float
    image: Image.Image


@dataclass(frozen=True)
class SampleSettings:
    """Everything the sample file sets; `requests` empty = random-caption mode."""

    batch_size: int
    seed: int
    resolution: int
    every_n_steps: int
    generate_pretrain_samples: bool
    cfgs: tuple[float, ...] = (7.0, 4.0, 1.01)
    scheduler: str = "ddim"
    num_inference_steps: int = 30
    show_progress_bars: bool = False
    requests: tuple[SampleRequest, ...] = ()

    @classmethod
    def defaults_from(cls, args: SimpleNamespace) -> SampleSettings:
        return cls(batch_size=max(1, args.batch_size // 2), seed=args.seed, resolution=args.resolution,
                   every_n_steps=args.sample_steps, generate_pretrain_samples=args.generate_pretrain_samples)


SETTINGS_KEYS = ("batch_size", "seed", "cfgs", "scheduler", "num_inference_steps", "resolution",
                 "show_progress_bars", "generate_pretrain_samples", "generate_samples_every_n_steps", "samples")
REQUEST_KEYS = ("prompt", "negative_prompt", "seed", "size", "aspect_ratio", "random_caption", "cfgs")


def cfgs_of(request: SampleRequest, settings: SampleSettings) -> tuple[float, ...]:
    """The guidance scales `request` is rendered at: its own, else the event's."""
    return request.cfgs or settings.cfgs


def _cfgs(where: str, cfgs) -> tuple[float, ...]:
    if not (isinstance(cfgs, list) and cfgs and all(is_number(c) and c >= 0 for c in cfgs)):
        raise ConfigError(f"{where}: key 'cfgs' must be a non-empty list of guidance scales (numbers >= 0), "
                          f"e.g. [7, 4, 1.01]; got {json.dumps(cfgs)}.")
    return tuple(float(c) for c in cfgs)


def _size_for_aspect(aspect_ratio: float, resolution: int) -> tuple[int, int]:
    """The training bucket of this resolution closest to the width/height ratio: about resolution² pixels."""
    return min(buckets_for(resolution), key=lambda bucket: abs(bucket[0] / bucket[1] - aspect_ratio))


# AUTOMATIC1111's "(word:1.3)": Compel has no such syntax and would encode the text "word:1 . 3".
_A1111_WEIGHT = re.compile(r"\(([^():]*):\s*(\d*\.?\d+)\s*\)")


def compel_syntax(prompt: str) -> str:
    """AUTOMATIC1111's `(words:1.3)`, which users also write for EveryDream2, in Compel's spelling `(words)1.3`:
    Compel itself would read it as the text `words:1 . 3`."""
    return _A1111_WEIGHT.sub(r"(\1)\2", prompt)


def prompt_syntax_problem(prompt: str) -> str:
    """Why `prompt` cannot be rendered as its weighting syntax asks (doc/SAMPLES.md, Weighted prompts); "" if it
    can. Unbalanced parentheses or quotes are not a problem: Compel takes them as text."""
    try:
        conjunction = Compel.parse_prompt_string(compel_syntax(prompt))
    except Exception as e:  # noqa: BLE001 - whatever the parser raises, the prompt cannot be encoded
        return f"Compel cannot parse it ({type(e).__name__}: {e})"
    if not conjunction.prompts:
        return "once its syntax is read, nothing is left to encode"
    if conjunction.lora_weights:
        return "useLora()/withLora() would load a LoRA, which samples cannot"
    if any(part.wants_cross_attention_control for part in conjunction.prompts):
        return ".swap() needs cross-attention control, which samples do not have"
    return ""


def _check_prompt(where: str, prompt: str) -> str:
    """`prompt`, or a ConfigError if a sampling event could not encode it (so an edit cannot fail mid-training)."""
    problem = prompt_syntax_problem(prompt)
    if problem:
        raise ConfigError(f"{where} is {json.dumps(prompt)}: {problem} (doc/SAMPLES.md, Weighted prompts).")
    return prompt


def _request(where: str, entry, seed: int, resolution: int) -> SampleRequest:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected an object such as {{\"prompt\": \"a photo of a cat\"}}, "
                          f"got {json.dumps(entry)}.")
    for key in entry:
        if key not in REQUEST_KEYS:
            raise unknown_key(where, key, REQUEST_KEYS)
    if "size" in entry:
        size = entry["size"]
        if not (isinstance(size, list) and len(size) == 2 and all(
                isinstance(side, int) and not isinstance(side, bool) and side >= 64 and side % 8 == 0
                for side in size)):
            raise ConfigError(f"{where}: key 'size' must be [width, height], each a multiple of 8 and at least 64, "
                              f"got {json.dumps(size)}.")
        width, height = size
    elif "aspect_ratio" in entry:
        ratio = entry["aspect_ratio"]
        if not is_number(ratio) or ratio <= 0:
            raise ConfigError(f"{where}: key 'aspect_ratio' must be a positive number (width / height, e.g. 1.5), "
                              f"got {json.dumps(ratio)}.")
        width, height = _size_for_aspect(ratio, resolution)
    else:
        width, height = resolution, resolution
    random_caption = boolean(where, "random_caption", entry.get("random_caption", False))
    prompt = string(where, "prompt", entry.get("prompt", ""))
    if not random_caption:  # otherwise the prompt is ignored
        _check_prompt(f"{where}: key 'prompt'", prompt)
    negative_prompt = string(where, "negative_prompt", entry.get("negative_prompt", ""))
    return SampleRequest(
        prompt=prompt,
        negative_prompt=_check_prompt(f"{where}: key 'negative_prompt'", negative_prompt),
        seed=integer(where, "seed", entry["seed"], -1) if "seed" in entry else seed,
        size=(width, height),
        random_caption=random_caption,
        cfgs=_cfgs(where, entry["cfgs"]) if "cfgs" in entry else None)


def _settings_from_json(path: Path, defaults: SampleSettings) -> SampleSettings:
    where = str(path)
    values = read_json_object(path, "Check the sample_prompts path.", "sample settings (doc/SAMPLES.md)")
    for key in values:
        if key not in SETTINGS_KEYS:
            raise unknown_key(where, key, SETTINGS_KEYS)
    checked: dict = {}
    for key in ("batch_size", "num_inference_steps"):
        if key in values:
            checked[key] = integer(where, key, values[key], 1)
    if "seed" in values:
        checked["seed"] = integer(where, "seed", values["seed"], -1)
    if "generate_samples_every_n_steps" in values:
        checked["every_n_steps"] = integer(where, "generate_samples_every_n_steps",
                                           values["generate_samples_every_n_steps"], 0)
    if "resolution" in values:
        checked["resolution"] = integer(where, "resolution", values["resolution"], 64)
        if checked["resolution"] % 64:
            raise ConfigError(f"{where}: key 'resolution' is {checked['resolution']}; use a multiple of 64.")
    for key in ("show_progress_bars", "generate_pretrain_samples"):
        if key in values:
            checked[key] = boolean(where, key, values[key])
    if "scheduler" in values:
        checked["scheduler"] = string(where, "scheduler", values["scheduler"])
        check_sampler_name(checked["scheduler"], where)
    if "cfgs" in values:
        checked["cfgs"] = _cfgs(where, values["cfgs"])
    settings = replace(defaults, **checked)
    requests = values.get("samples") or []
    if not isinstance(requests, list):
        raise ConfigError(f"{where}: key 'samples' must be a list of objects such as "
                          f"{{\"prompt\": \"a photo of a cat\"}}, got {json.dumps(requests)}.")
    return replace(settings, requests=tuple(
        _request(f"{where}: samples[{i}]", entry, settings.seed, settings.resolution)
        for i, entry in enumerate(requests)))


def _settings_from_txt(path: Path, defaults: SampleSettings) -> SampleSettings:
    lines = enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
    prompts = [_check_prompt(f"{path}: line {number}", line.strip()) for number, line in lines if line.strip()]
    size = (defaults.resolution, defaults.resolution)
    return replace(defaults, requests=tuple(SampleRequest(p, seed=defaults.seed, size=size) for p in prompts))


def read_sample_settings(path: str | Path, defaults: SampleSettings) -> SampleSettings:
    """The sample file over `defaults` (keys it leaves out keep the default); ConfigError if it is invalid.

    A missing file is a FileNotFoundError: the caller decides whether that is worth a warning.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".json"):
        raise ConfigError(f"sample_prompts '{path}': use a .txt file (one prompt per line) or a .json sample "
                          "config (doc/SAMPLES.md).")
    if not path.is_file():
        raise FileNotFoundError(f"sample_prompts '{path}' not found")
    try:
        return _settings_from_json(path, defaults) if suffix == ".json" else _settings_from_txt(path, defaults)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e}). Save it as UTF-8.") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e}).") from None


@dataclass(frozen=True)
class SampleEvent:
    """One sampling event's settings and its requests made concrete (prompts filled in, random seeds drawn), so
    every model sampled at this event (e.g. the EMA and the training weights) renders exactly the same requests."""

    settings: SampleSettings
    requests: tuple[SampleRequest, ...]


class SampleSchedule:
    """When to sample and with what: the sample file, checked at startup and re-read before every event.

    Precedence for the interval and the pre-training switch: command line > sample .json > train.json > default.
    """

    def __init__(self, path: str | Path, defaults: SampleSettings, command_line: dict | None = None):
        self.path = Path(path)
        self.defaults = defaults
        self.command_line = command_line or {}  # SampleSettings fields given on the command line
        self.scheduler_config = None
        self._problem = ""  # the last unreadable-file warning, so it is not repeated at every event
        self.settings = self._with_command_line(defaults)
        if self.settings.every_n_steps == 0 and "every_n_steps" in self.command_line:
            return  # sampling switched off on the command line: the file is never used
        try:
            self.settings = self._read()
        except FileNotFoundError as e:
            if self.settings.every_n_steps:
                self._warn(f"{e}: samples will use captions of the current training batch.")

    @classmethod
    def from_args(cls, args: SimpleNamespace) -> SampleSchedule:
        flags = {"every_n_steps": "sample_steps", "generate_pretrain_samples": "generate_pretrain_samples"}
        given = {setting: getattr(args, flag) for setting, flag in flags.items()
                 if args.sources.get(flag) == "command line"}
        return cls(args.sample_prompts, SampleSettings.defaults_from(args), given)

    def _with_command_line(self, settings: SampleSettings) -> SampleSettings:
        return replace(settings, **self.command_line)

    def _read(self) -> SampleSettings:
        settings = self._with_command_line(read_sample_settings(self.path, self.defaults))
        if self.scheduler_config is not None:
            make_sampler(sampler_for(settings.scheduler, self.scheduler_config), self.scheduler_config)
        return settings

    def _warn(self, problem: str) -> None:
        if problem != self._problem:
            log.warning(problem)
            self._problem = problem

    def check_model(self, scheduler_config) -> None:
        """ConfigError if the chosen sampler cannot sample this model; later edits are checked against it too."""
        make_sampler(sampler_for(self.settings.scheduler, scheduler_config), scheduler_config)
        self.scheduler_config = scheduler_config

    @property
    def pretrain_due(self) -> bool:
        return self.settings.every_n_steps > 0 and self.settings.generate_pretrain_samples

    def due(self, global_step: int) -> bool:
        every = self.settings.every_n_steps
        return every > 0 and global_step % every == 0

    def prepare(self, global_step: int, captions: list[str]) -> SampleEvent:
        """Re-reads the sample file (an invalid or missing one keeps the previous settings, with a warning) and
        fixes this event's prompts and seeds. `captions` (the current batch's) feed the random-caption requests."""
        previous = self.settings
        try:
            self.settings = self._read()
            self._problem = ""
        except FileNotFoundError as e:
            self._warn(f"{e}: keeping the previous sample settings.")
        except ConfigError as e:
            self._warn(f"Sample file not reloaded, keeping the previous settings: {e}")
        every = self.settings.every_n_steps
        if every != previous.every_n_steps:
            if every:
                log.info("%s: samples now every %d steps (was %d); next after step %d.", self.path, every,
                         previous.every_n_steps, (global_step // every + 1) * every)
            else:
                log.info("%s: generate_samples_every_n_steps is 0: no more samples in this run (the file is "
                         "re-read only when samples are due).", self.path)
        return SampleEvent(self.settings, self._concrete_requests(captions))

    def _concrete_requests(self, captions: list[str]) -> tuple[SampleRequest, ...]:
        settings = self.settings
        square = (settings.resolution, settings.resolution)
        requests = settings.requests or tuple(
            SampleRequest("", seed=settings.seed, size=square, random_caption=True)
            for _ in range(min(RANDOM_CAPTION_REQUESTS, settings.batch_size)))
        # A dropped caption (cond_dropout) is blank: it would only show an unconditional image.
        batch_captions = itertools.cycle([c for c in captions if c.strip()] or [""])
        draw = random.SystemRandom()  # never the global random state, which training owns
        concrete = []
        for request in requests:
            if request.random_caption:
                request = replace(request, prompt=next(batch_captions))
            if request.seed == -1:
                request = replace(request, seed=draw.randrange(2**31))
            concrete.append(request)
        return tuple(concrete)


# -- rendering ---------------------------------------------------------------------------------------------------

def _file_stem(prompt: str) -> str:
    return re.sub(r"[^A-Za-z0-9 ]", "", prompt)[:100].rstrip()


def _label(tile: Image.Image, text: str) -> Image.Image:
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 4
    x, y = tile.width - w, tile.height - h
    draw.rectangle((x, y, tile.width, tile.height), fill="white")
    draw.text((x + 2 - left, y + 2 - top), text, fill="black", font=font)
    return tile


class _ClipSkipTextEncoder:
    """The text encoder as Compel calls it, answering with `encode_text`'s conditioning (clip_skip included) as the
    `last_hidden_state` Compel reads: a prompt without weights is then conditioned exactly as training conditions a
    caption, and weights apply to that conditioning. (Compel's own clip skip is the penultimate layer only, and
    reaches for a `text_model` that transformers 5's CLIPTextModel no longer has.)"""

    def __init__(self, text_encoder, clip_skip: int):
        self.text_encoder, self.clip_skip = text_encoder, clip_skip

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.dtype

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **_hidden_state_options) -> SimpleNamespace:
        # Compel also passes output_hidden_states and return_dict, for its own clip skip; encode_text needs neither.
        return SimpleNamespace(last_hidden_state=encode_text(self.text_encoder, input_ids, self.clip_skip,
                                                             attention_mask))


class SamplePromptEncoder:
    """Sample requests -> the pipeline's prompt and negative prompt embeddings.

    Prompts and negative prompts are read with Compel's weighting syntax; a caption taken from the training batch
    (random_caption) is encoded as training encodes it, syntax and all, since training never parses captions. Like
    training, Compel cuts a prompt to the tokenizer's 77 tokens (its default)."""

    def __init__(self, tokenizer, text_encoder, clip_skip: int):
        self.tokenizer, self.text_encoder, self.clip_skip = tokenizer, text_encoder, clip_skip
        self.compel = Compel(tokenizer=tokenizer, text_encoder=_ClipSkipTextEncoder(text_encoder, clip_skip))

    def _caption(self, caption: str) -> torch.Tensor:
        return encode_text(self.text_encoder, token_ids(self.tokenizer, [caption]), self.clip_skip)

    def encode(self, requests: list[SampleRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [self._caption(r.prompt) if r.random_caption else self.compel(compel_syntax(r.prompt))
                   for r in requests]
        negatives = [self.compel(compel_syntax(r.negative_prompt)) for r in requests]
        # .and() gives 77 tokens per part; one batch of the pipeline needs one length, so shorter ones are padded
        # with the empty prompt's conditioning (Compel's padding).
        padded = self.compel.pad_conditioning_tensors_to_same_length(prompts + negatives)
        return torch.cat(padded[:len(requests)]), torch.cat(padded[len(requests):])


def sample_names(step: int, index: int, request: SampleRequest, label: str = "") -> tuple[str, str]:
    """(file stem, TensorBoard tag) of one request's strip; doc/SAMPLES.md documents both."""
    marker = f"_{label}" if label else ""
    prompt = _file_stem(request.prompt)
    stem = f"gs{step:05d}-{index:03d}{marker}-{prompt}-s{request.seed}"
    tag = f"sample_{index:03d}{marker}" + ("" if request.random_caption else f"_{prompt}")
    return stem, tag


def _batches(requests: tuple[SampleRequest, ...], settings: SampleSettings) -> list[list[int]]:
    """Request indices in batches of at most the sample batch_size; only requests of the same size and the same
    cfgs share a batch (a batch is rendered once per cfg)."""
    alike: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        alike.setdefault((request.size, cfgs_of(request, settings)), []).append(index)
    size = settings.batch_size
    return [indices[i:i + size] for indices in alike.values() for i in range(0, len(indices), size)]


@torch.no_grad()
def generate_samples(model, unet, text_encoder, event: SampleEvent, *, step: int, out_dir: Path, tb_writer,
                     autocast, clip_skip: int = 0, label: str = "",
                     rendered: list[RenderedSample] | None = None) -> list[Path]:
    """Renders every request of `event` once per cfg (its own `cfgs`, else the event's) into a labelled strip; saves the JPEG and a .txt beside it
    and logs the strip to TensorBoard at `step`. Returns the JPEG paths.

    `unet` and `text_encoder` are the live modules (their dtype and device as trained; no copy is made), `model`
    gives the VAE, tokenizer and scheduler config. `label` (e.g. "ema") marks file names and tags when several
    models are sampled at one event. Training's random state is the same afterwards as before. Each image drawn is
    also appended to `rendered` when given.
    """
    from diffusers import StableDiffusionPipeline

    settings, requests = event.settings, event.requests
    sampler = sampler_for(settings.scheduler, model.scheduler.config)
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=text_encoder, tokenizer=model.tokenizer, unet=unet,
                                   scheduler=make_sampler(sampler, model.scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=not settings.show_progress_bars)
    guidance_rescale = ZERO_SNR_GUIDANCE_RESCALE if model.scheduler.config.get("rescale_betas_zero_snr") else 0.0
    started = time.perf_counter()
    own = sum(request.cfgs is not None for request in requests)
    log.info("Sampling at step %d%s: %d prompt(s) x cfgs %s%s, %s %d steps", step, f" ({label})" if label else "",
             len(requests), ", ".join(f"{c:g}" for c in settings.cfgs),
             f" ({own} with cfgs of their own)" if own else "", sampler, settings.num_inference_steps)
    was_training = (unet.training, text_encoder.training)
    unet.eval()
    text_encoder.eval()
    device = unet.device
    if unet.dtype != model.vae.dtype and device.type == "cpu":  # bf16_weights on the CPU, where there is no AMP
        autocast = functools.partial(torch.autocast, "cpu", dtype=unet.dtype)
    prompt_encoder = SamplePromptEncoder(model.tokenizer, text_encoder, clip_skip)
    strips: list[list] = [[] for _ in requests]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast():
            for batch in _batches(requests, settings):
                width, height = requests[batch[0]].size
                # The conditioning as training computes it (clip_skip included), not the pipeline's own encoding.
                prompt_embeds, negative_embeds = prompt_encoder.encode([requests[i] for i in batch])
                for cfg in cfgs_of(requests[batch[0]], settings):
                    # One generator per request, so an image depends on its own seed, not on its batch-mates.
                    generators = [torch.Generator(device).manual_seed(requests[i].seed) for i in batch]
                    images = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                                  height=height, width=width, num_inference_steps=settings.num_inference_steps,
                                  guidance_scale=cfg, guidance_rescale=guidance_rescale,
                                  generator=generators).images
                    for i, image in zip(batch, images):
                        strips[i].append(_label(image, f"cfg:{cfg:g}"))
                        if rendered is not None:
                            rendered.append(RenderedSample(requests[i].prompt, requests[i].seed, cfg, image))
    finally:
        unet.train(was_training[0])
        text_encoder.train(was_training[1])
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (request, tiles) in enumerate(zip(requests, strips)):
        strip = Image.new("RGB", (sum(t.width for t in tiles), tiles[0].height), "white")
        for n, tile in enumerate(tiles):
            strip.paste(tile, (n * tile.width, 0))
        stem, tag = sample_names(step, index, request, label)
        strip.save(out_dir / f"{stem}.jpg", quality=95)
        lines = [request.prompt]
        if request.negative_prompt:
            lines.append(f"negative prompt: {request.negative_prompt}")
        lines += [f"seed: {request.seed}", f"cfgs: {', '.join(f'{c:g}' for c in cfgs_of(request, settings))}",
                  f"sampler: {sampler}, {settings.num_inference_steps} steps",
                  f"size: {request.size[0]}x{request.size[1]}"]
        (out_dir / f"{stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        tb_writer.add_image(tag, np.asarray(strip), step, dataformats="HWC")
        written.append(out_dir / f"{stem}.jpg")
    log.info("Samples written to %s in %.1f s", out_dir, time.perf_counter() - started)
    return written


class SampleImages:
    """The loop's part for samples: before training (unless resuming) and whenever the schedule says so, each
    sampled model ("" = the trained weights, "ema" = the EMA's) renders the same event. The first process samples
    for all."""

    def __init__(self, schedule: SampleSchedule, model, accelerator, run, args, ema_model=None,
                 sampled_models: tuple[str, ...] = ("",)):
        self.schedule, self.model, self.accelerator, self.run, self.args = schedule, model, accelerator, run, args
        self.ema, self.sampled_models = ema_model, sampled_models

    def training_start(self, trainer) -> None:
        if not trainer.resumed and self.schedule.pretrain_due and self.run:
            self.sample(trainer, 0, trainer.data.first_captions())

    def step_end(self, trainer, batch, out) -> None:
        if self.schedule.due(trainer.global_step):
            self.sample(trainer, trainer.global_step, batch["captions"])

    def sample(self, trainer, step: int, captions: list[str]) -> None:
        """Renders one event; then the loop's `samples_rendered` event hands each model's images to the parts
        that judge them (plugins' on_samples_rendered)."""
        if self.run is None:
            return
        event = self.schedule.prepare(step, captions)  # one event: every sampled model gets the same prompts and seeds
        for label in self.sampled_models:
            rendered: list[RenderedSample] = []
            with self.ema.swapped_in() if label == "ema" else contextlib.nullcontext():
                generate_samples(self.model, self.accelerator.unwrap_model(self.model.unet),
                                 self.accelerator.unwrap_model(self.model.text_encoder), event, step=step,
                                 out_dir=self.run.samples, tb_writer=self.run.tb, autocast=self.accelerator.autocast,
                                 clip_skip=self.args.clip_skip, label=label, rendered=rendered)
            trainer.emit("samples_rendered", step=step, label=label, samples=rendered)
