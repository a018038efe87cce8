"""Loading and saving Stable Diffusion models, offline.

Loading takes a diffusers folder, or a single `.safetensors` / `.ckpt` file in the original (LDM) layout read
by diffusers' own `from_single_file`, given configs that ship with this project (utils/model/model_configs) so no
hub is needed. Which config fits a file is decided from its weights: SD1.x (768-wide cross-attention) or
SD2.x (1024); SD2 768 v-prediction versus 512 epsilon from the file's metadata, a `.yaml` beside it, or
failing both the model's own output (the test AUTOMATIC1111 uses). Files this trainer wrote carry their
exact configs in the safetensors metadata, so any architecture, the tiny test model included, loads back.

Saving writes a diffusers folder and a single file in LDM layout, each atomically.
"""
from __future__ import annotations

import inspect
import json
import logging
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, \
    UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from utils.objective import flow
from utils.model import shipped
from utils.run.checkpoint import atomic_dir, atomic_file
from utils.model.ldm_convert import CLIP_PREFIX, OPENCLIP_PREFIX, ldm_keys, pipeline_to_ldm, text_layout

log = logging.getLogger(__name__)

CONFIG_METADATA_KEY = "sd_trainer_configs"
SD2_PROBE_KEY = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
TRAIN_SAMPLERS = {"ddpm": DDPMScheduler, "pndm": PNDMScheduler, "ddim": DDIMScheduler}
CARRIED_FILE = "ldm_carried.safetensors"  # in our diffusers folders: the tensors carried from an original file
EMA_KEY_PREFIX = "model_ema."  # an original file's EMA copy of its UNet: stale once the UNet is trained
# Empty tensors that mark how a single file samples, by ComfyUI's convention (its own saves of a v-prediction model
# write `v_pred`): AUTOMATIC1111 samples a file with `ztsnr` with the zero-terminal-SNR schedule, whatever its
# architecture; ComfyUI and A1111 read `v_pred` for SDXL files. Written afresh at each save, never carried over.
SAMPLING_MARKS = ("v_pred", "ztsnr")


class ModelLoadError(Exception):
    """A model file or folder that cannot be used; the message names it and says why."""


@dataclass
class StableDiffusion:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    tokenizer: CLIPTokenizer
    scheduler: object  # the inference scheduler saved with the model
    source: str
    # Tensors of the original single file that the diffusers model has no place for (SD2's 24th text encoder
    # layer, text_projection and logit_scale; the LDM noise schedule buffers): written back unchanged into every
    # single file saved, and kept beside the weights in diffusers folders (CARRIED_FILE) for later saves.
    carried: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def family(self) -> str:
        return "SD2.x" if self.unet.config.cross_attention_dim == 1024 else (
            "SD1.x" if self.unet.config.cross_attention_dim == 768 else "custom")

    def noise_scheduler(self, train_sampler: str):
        """The scheduler that noises training latents (same betas and prediction type as the model's)."""
        scheduler_class = TRAIN_SAMPLERS[train_sampler]
        if self.scheduler.config.get("rescale_betas_zero_snr") and not _can_rescale_to_zero_snr(scheduler_class):
            # from_config would drop the setting without a word and train on the original betas.
            raise ModelLoadError(f"train_sampler '{train_sampler}' cannot use zero-terminal-SNR betas (set by "
                                 f"enable_zero_terminal_snr, or saved with {self.source}). Use train_sampler ddpm "
                                 "or ddim.")
        return scheduler_class.from_config(self.scheduler.config)

    def use_zero_terminal_snr(self) -> None:
        """Rescales the betas so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1, as diffusers'
        rescale_betas_zero_snr) and spaces sampling timesteps "trailing" so sampling starts from that timestep
        (§3.3), in the scheduler saved with the model: the training noise scheduler, the sampler and every saved
        checkpoint then use the same schedule."""
        if self.prediction_type != "v_prediction":
            raise ModelLoadError(
                f"enable_zero_terminal_snr needs a v-prediction model; {self.source} predicts {self.prediction_type}. "
                "At zero SNR the noisy latent is pure noise, so predicting that noise says nothing about the image "
                "and samplers divide by zero at the last timestep (the saved model would sample NaN images). Use a "
                "v-prediction model (e.g. SD 2.x 768-v) or turn enable_zero_terminal_snr off.")
        scheduler_class = type(self.scheduler)
        if not _can_rescale_to_zero_snr(scheduler_class):
            scheduler_class = DDIMScheduler  # e.g. PNDM has no such option; DDIM is what the paper samples with
        self.scheduler = scheduler_class.from_config(self.scheduler.config, rescale_betas_zero_snr=True,
                                                     timestep_spacing="trailing")

    def carried_summary(self) -> list[str]:
        """For the run log: what single files saved from this model carry unchanged, and what they cannot."""
        lines = []
        if self.carried:
            lines.append(f"Single-file saves carry {len(self.carried)} tensors of {self.source} unchanged that the "
                         f"diffusers model does not hold: {_key_groups(self.carried)}.")
        te_config = self.text_encoder.config
        if text_layout(te_config) == "openclip":  # SD2's text encoder
            last_layer = f"{OPENCLIP_PREFIX}transformer.resblocks.{te_config.num_hidden_layers}."
            if not any(key.startswith(last_layer) for key in self.carried):
                lines.append(f"Single files saved from this run lack {last_layer}*, {OPENCLIP_PREFIX}text_projection "
                             f"and {OPENCLIP_PREFIX}logit_scale of OpenCLIP's last text encoder layer, which SD2 does "
                             f"not use and {self.source} does not hold. Image generators use the layer before it by "
                             "default; in ComfyUI do not set 'CLIP Set Last Layer' to -1. Start from the original "
                             "single file to keep them.")
        return lines

    def describe(self) -> str:
        n_unet = sum(p.numel() for p in self.unet.parameters()) / 1e6
        n_te = sum(p.numel() for p in self.text_encoder.parameters()) / 1e6
        return (f"{self.family} {self.prediction_type} from {self.source} "
                f"(UNet {n_unet:.1f}M params, text encoder {n_te:.1f}M)")


def _can_rescale_to_zero_snr(scheduler_class) -> bool:
    return "rescale_betas_zero_snr" in inspect.signature(scheduler_class.__init__).parameters


def load(path: str | Path) -> StableDiffusion:
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if path.suffix.lower() in (".safetensors", ".ckpt"):
        return _load_single_file(path)
    raise ModelLoadError(f"{path}: not a diffusers folder or a .safetensors/.ckpt file.")


# The weights file each model part of a diffusers folder needs: <stem>.safetensors, .bin, or a sharded index of either.
FOLDER_WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _missing_parts(path: Path) -> list[str]:
    """What a diffusers folder lacks: whole parts by name, else the files a part that is there needs."""
    missing = [] if (path / "model_index.json").is_file() else ["model_index.json"]
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        if not (path / part).is_dir():
            missing.append(part)
            continue
        config = "scheduler_config.json" if part == "scheduler" else "config.json"
        if not (path / part / config).is_file():
            missing.append(f"{part}/{config}")
        stem = FOLDER_WEIGHTS.get(part)
        if stem and not any((path / part / f"{stem}{suffix}").is_file() for suffix in WEIGHT_SUFFIXES):
            missing.append(f"{part}/{stem}.safetensors")
    return missing


def _load_folder(path: Path) -> StableDiffusion:
    missing = _missing_parts(path)
    if missing:
        raise ModelLoadError(f"{path}: not a complete diffusers model folder (missing {', '.join(missing)}). Copy the "
                             "whole model folder again, or give a single .safetensors/.ckpt file.")
    try:
        with torch.serialization.safe_globals(CKPT_STAND_INS):  # .bin weights are pickles too
            # In fp32 whatever the files hold (a bf16_weights run saves bf16): the run's options set the dtypes.
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True,
                                                        torch_dtype=torch.float32)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True, torch_dtype=torch.float32)
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True,
                                                         dtype=torch.float32)
        scheduler_file = path / "scheduler" / "scheduler_config.json"
        scheduler = _scheduler_class(json.loads(scheduler_file.read_text(encoding="utf-8")), str(scheduler_file)) \
            .from_pretrained(path, subfolder="scheduler")
        if (path / "tokenizer" / "vocab.json").is_file():
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        else:
            tokenizer = shipped.load_tokenizer("sd2" if unet.config.cross_attention_dim == 1024 else "sd1")
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - diffusers and transformers raise many types for a broken part
        reason = _unreadable_reason(e)
        advice = "Use a copy of the model with .safetensors weights." if reason.startswith("refused") else \
            "A part of the folder is damaged or does not match its config.json; copy the model folder again."
        raise ModelLoadError(f"{path}: could not load the model ({reason}). {advice}") from None
    carried = load_file(path / CARRIED_FILE) if (path / CARRIED_FILE).is_file() else {}
    return StableDiffusion(unet, text_encoder, vae, tokenizer, scheduler, str(path), carried)


def _scheduler_class(config, where: str):
    """The diffusers scheduler class a scheduler config names (PNDM when it names none); `where` is its file."""
    import diffusers

    if not isinstance(config, dict):
        raise ModelLoadError(f"{where}: not a JSON object of scheduler settings. Use another copy of the model.")
    name = config.get("_class_name", "PNDMScheduler")
    scheduler_class = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
        raise ModelLoadError(f"{where}: the scheduler's '_class_name' is {json.dumps(name)}, not a diffusers scheduler "
                             "(such as PNDMScheduler or DDIMScheduler). Use another copy of the model.")
    return scheduler_class


class _LightningCallbackKey:
    """Stands in for the PyTorch Lightning callback class that original SD training checkpoints (such as
    sd-v1-4.ckpt) name as a dictionary key next to their weights. Only the name is matched; nothing runs."""


# The only Python objects besides tensors and plain data that a .ckpt may name, each mapped to an inert stand-in.
CKPT_STAND_INS = [(_LightningCallbackKey, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]


def _unreadable_reason(error: Exception) -> str:
    """A loading library's exception as one short clause for our messages.

    torch's refusal of a pickle that would import or call code gets its own wording: its text advises loading
    the file with weights_only=False, which is exactly what must not be done with an untrusted file."""
    refusal = error
    while refusal is not None and not isinstance(refusal, pickle.UnpicklingError):
        refusal = refusal.__cause__ or refusal.__context__  # diffusers re-raises torch's refusal as an OSError
    if refusal is not None and "weights_only" in str(refusal):
        text = str(refusal)
        named = re.search(r"GLOBAL ([\w.]+)", text)
        if named:
            return (f"refused: it is a pickle that names the Python object '{named[1]}', and loading it could run "
                    "code; only tensors and plain data are read from pickled files")
        stopped = re.search(r"Unsupported operand \d+", text)
        return f"not a pickle torch.save wrote; the weights-only reader stopped at: {stopped[0] if stopped else 'it'}"
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    first = first.split(" If you want to instead overwrite")[0]  # diffusers' advice to its callers, not to ours
    return f"{type(error).__name__}: {first[:300]}" if first else type(error).__name__


def _read_file_header(path: Path) -> tuple[dict, dict]:
    """Returns (metadata, {key: shape}) without loading the weights; refuses pickled code in .ckpt files."""
    try:
        if path.suffix.lower() == ".safetensors":
            with safe_open(path, framework="pt") as f:
                return f.metadata() or {}, {k: f.get_slice(k).get_shape() for k in f.keys()}
        # weights_only refuses any pickle that would import or call code. Only zip-format files can be mapped.
        with torch.serialization.safe_globals(CKPT_STAND_INS):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable file; say which and why
        reason = _unreadable_reason(e)
        advice = "Use the model's .safetensors download instead." if reason.startswith("refused") else \
            "It may be truncated (download it again) or not a model checkpoint at all."
        raise ModelLoadError(f"{path}: cannot read this checkpoint ({reason}). {advice}") from None
    weights = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(weights, dict):
        raise ModelLoadError(f"{path}: not a model checkpoint: it holds a {type(weights).__name__}, not a dictionary "
                             "of named weights.")
    return {}, {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}


def _config_folder_for(path: Path, metadata: dict, shapes: dict, scratch: Path) -> tuple[Path, str]:
    """Picks (or writes, from our own metadata) the diffusers config folder for a single file."""
    if CONFIG_METADATA_KEY in metadata:
        try:
            configs = json.loads(metadata[CONFIG_METADATA_KEY])
            parts = {part: dict(configs[part]) for part in ("unet", "vae", "text_encoder", "scheduler")}
            tokenizer_kind = configs["tokenizer"]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{path}: the model configs in its '{CONFIG_METADATA_KEY}' metadata are damaged "
                                 f"({type(e).__name__}: {str(e)[:200]}). Use another copy of the file.") from None
        if tokenizer_kind not in ("sd1", "sd2"):
            raise ModelLoadError(f"{path}: its metadata names tokenizer {json.dumps(tokenizer_kind)}; this trainer "
                                 "writes 'sd1' or 'sd2'. Use another copy of the file.")
        for part, config in parts.items():
            name = "scheduler_config.json" if part == "scheduler" else "config.json"
            (scratch / part).mkdir(parents=True)
            (scratch / part / name).write_text(json.dumps(config))
        scheduler = _scheduler_class(parts["scheduler"], f"{path} (its '{CONFIG_METADATA_KEY}' metadata)").__name__
        (scratch / "model_index.json").write_text(json.dumps(_model_index(scheduler)))
        return scratch, tokenizer_kind
    if SD2_PROBE_KEY not in shapes:
        raise ModelLoadError(f"{path}: not a Stable Diffusion 1.x/2.x checkpoint (no '{SD2_PROBE_KEY}'). SDXL, SD3 "
                             "and other families are not supported.")
    if shapes[SD2_PROBE_KEY][-1] == 768:
        return shipped.config_dir("sd15"), "sd1"
    yaml_beside = path.with_suffix(".yaml")
    if yaml_beside.is_file():
        return shipped.config_dir("sd2-v" if _yaml_says_v(yaml_beside) else "sd2-base"), "sd2"
    return shipped.config_dir("sd2-base"), "sd2"  # prediction type settled by _probe_v_prediction


def _yaml_says_v(path: Path) -> bool:
    """Whether an original-SD inference yaml (as image generators keep beside a checkpoint) says v-prediction."""
    import yaml

    try:
        params = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("model", {}).get("params", {})
        return params.get("parameterization") == "v"
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelLoadError(f"{path}: not a readable model yaml ({type(e).__name__}: {str(e)[:200]}). Fix or "
                             "remove it.") from None


def _model_index(scheduler_class: str) -> dict:
    return {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", scheduler_class],
            "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}


def read_configs(path: str | Path) -> dict[str, dict]:
    """The unet, text_encoder and vae configs of a model folder or single file, without loading its weights (the
    memory plan sizes the run from them)."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as scratch:
        if path.is_dir():
            folder = path
        else:
            metadata, shapes = _read_file_header(path)
            folder, _ = _config_folder_for(path, metadata, shapes, Path(scratch) / "config")
        try:
            return {part: json.loads((folder / part / "config.json").read_text(encoding="utf-8"))
                    for part in ("unet", "text_encoder", "vae")}
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{folder}: cannot read the model's configs ({type(e).__name__}: {str(e)[:200]}). "
                                 "Copy the whole model folder again.") from None


def _load_single_file(path: Path) -> StableDiffusion:
    metadata, shapes = _read_file_header(path)
    with tempfile.TemporaryDirectory() as scratch:
        config, tokenizer_kind = _config_folder_for(path, metadata, shapes, Path(scratch) / "config")
        tokenizer = shipped.load_tokenizer(tokenizer_kind)
        try:
            with torch.serialization.safe_globals(CKPT_STAND_INS):
                pipe = StableDiffusionPipeline.from_single_file(
                    str(path), config=str(config), tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False, local_files_only=True, torch_dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - diffusers raises many types for a mismatched file
            # Weights the file lacks stay on the meta device, and diffusers then fails to move them.
            reason = "weights the model needs are missing from it" if "meta tensor" in str(e) else \
                f"diffusers could not load it as a Stable Diffusion checkpoint ({_unreadable_reason(e)})"
            raise ModelLoadError(f"{path}: {reason}. It may be incomplete, or for another architecture (SDXL, SD3, "
                                 "an inpainting or LoRA file); use a complete SD 1.x/2.x checkpoint.") from None
    model = StableDiffusion(pipe.unet, pipe.text_encoder, pipe.vae, tokenizer, pipe.scheduler, str(path))
    model.carried = _carried_tensors(path, shapes, ldm_keys(model.unet, model.vae, model.text_encoder))
    needs_probe = CONFIG_METADATA_KEY not in metadata and model.family == "SD2.x" and \
        not path.with_suffix(".yaml").is_file()
    if needs_probe and _probe_v_prediction(model.unet):
        model.scheduler = type(model.scheduler).from_pretrained(shipped.config_dir("sd2-v"), subfolder="scheduler")
        model.unet.register_to_config(sample_size=96)
    return model


def _carried_tensors(path: Path, file_keys, written: set[str]) -> dict[str, torch.Tensor]:
    """The tensors of an original file that a single file saved from its diffusers model would not have, except
    its EMA copy and old names of what is written (A1111 renames `cond_stage_model.transformer.embeddings.` and the
    like to their `text_model.` names, so a stale copy under an old name would replace the trained weights)."""
    def aliases_written(key: str) -> bool:
        return key.startswith(CLIP_PREFIX) and CLIP_PREFIX + "text_model." + key[len(CLIP_PREFIX):] in written

    keys = [key for key in file_keys if key not in written and key not in SAMPLING_MARKS
            and not key.startswith(EMA_KEY_PREFIX) and not aliases_written(key)]
    if not keys:
        return {}
    if path.suffix.lower() == ".safetensors":
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in keys}
    with torch.serialization.safe_globals(CKPT_STAND_INS):
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    weights = state.get("state_dict", state)
    return {key: weights[key].clone() for key in keys}  # a copy: not tied to the file's memory map


def _key_groups(keys, shown: int = 8) -> str:
    """Keys in short: those of one numbered layer as `prefix.N.*` (with their count)."""
    groups: dict[str, int] = {}
    for key in keys:
        layer = re.match(r"(.*\.\d+)\.", key)
        name = f"{layer[1]}.*" if layer else key
        groups[name] = groups.get(name, 0) + 1
    names = [f"{name} ({count})" if count > 1 else name for name, count in groups.items()]
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


@torch.no_grad()
def _probe_v_prediction(unet: UNet2DConditionModel) -> bool:
    """SD2 768-v and 512-base share every shape; a v-model's output at t=999 on a flat input gives it away."""
    x = torch.full((1, 4, 8, 8), 0.5)
    cond = torch.full((1, 2, unet.config.cross_attention_dim), 0.5)
    out = unet(x, torch.tensor([999]), encoder_hidden_states=cond).sample
    is_v = (out - x).mean().item() < -1
    log.info("SD2 checkpoint without metadata: detected %s from the model's output.",
             "v-prediction (768)" if is_v else "epsilon (512)")
    return is_v


def _pipeline(model: StableDiffusion, unet, text_encoder) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(vae=model.vae, text_encoder=text_encoder, tokenizer=model.tokenizer, unet=unet,
                                   scheduler=model.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_diffusers(model: StableDiffusion, unet, text_encoder, folder: Path,
                   optimizer_states: dict[str, dict] | None = None, run_state=None) -> None:
    """Writes a complete diffusers pipeline folder (plus optimizer state and the run's training state when
    given: utils.run.training_state), atomically."""
    from utils.run import training_state

    with atomic_dir(folder) as scratch:
        _pipeline(model, unet, text_encoder).save_pretrained(scratch, safe_serialization=True)
        if model.carried:
            save_file({key: tensor.contiguous() for key, tensor in model.carried.items()}, str(scratch / CARRIED_FILE))
        for name, state in (optimizer_states or {}).items():
            torch.save(state, scratch / f"optimizer_{'te' if name == 'text_encoder' else name}.pt")
        if run_state is not None:
            training_state.save(run_state, scratch)


def save_single_file(model: StableDiffusion, unet, text_encoder, file: Path, full_precision: bool) -> None:
    """Writes one .safetensors in the original SD layout, with our configs in its metadata, atomically."""
    dtype = torch.float32 if full_precision else torch.float16
    tensors = pipeline_to_ldm(unet, model.vae, text_encoder, dtype=dtype)
    tensors.update((key, tensor.contiguous()) for key, tensor in model.carried.items() if key not in tensors)
    tensors.update((mark, torch.tensor([])) for mark in sampling_marks(model.scheduler.config))
    configs = {"unet": dict(unet.config), "vae": dict(model.vae.config), "text_encoder": text_encoder.config.to_dict(),
               "scheduler": dict(model.scheduler.config),
               "tokenizer": "sd2" if model.tokenizer.pad_token == "!" else "sd1"}
    metadata = {CONFIG_METADATA_KEY: json.dumps(configs, default=str), "prediction_type": model.prediction_type,
                **flow.single_file_metadata(model.scheduler.config)}
    with atomic_file(file) as scratch:
        save_file(tensors, str(scratch), metadata=metadata)
    if unet.config.cross_attention_dim == 1024:
        # Image generators need the original SD2 yaml beside the file to tell a v-model from an epsilon one.
        # A rectified-flow model started as a v-model; no original yaml describes flow sampling (its metadata does).
        v_like = model.prediction_type in ("v_prediction", "flow_prediction")
        yaml_name = "v2-inference-v.yaml" if v_like else "v2-inference.yaml"
        with atomic_file(file.with_suffix(".yaml")) as scratch:
            scratch.write_bytes((shipped.MODEL_CONFIGS / "ldm" / yaml_name).read_bytes())


def sampling_marks(scheduler_config) -> list[str]:
    """The SAMPLING_MARKS that describe a model with this scheduler config."""
    marks = ["v_pred"] if scheduler_config.get("prediction_type") == "v_prediction" else []
    return marks + (["ztsnr"] if scheduler_config.get("rescale_betas_zero_snr") else [])


def load_optimizer_states(folder: Path) -> dict[str, dict]:
    """Optimizer state saved with `save_optimizer` in a diffusers folder, if any."""
    states = {}
    for name, file in (("unet", "optimizer_unet.pt"), ("text_encoder", "optimizer_te.pt"),
                       ("stochastic_rounding", "optimizer_stochastic_rounding.pt")):  # bf16_weights' random stream
        path = Path(folder) / file
        if not path.is_file():
            continue
        # Optional state: one that cannot be read is skipped with a warning (REFERENCE §6.5), the model still loads.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to read the file means the same
            log.warning("%s: cannot read the saved optimizer state (%s); starting with a fresh optimizer.", path,
                        _unreadable_reason(e))
            continue
        expected = {"generator"} if name == "stochastic_rounding" else {"state", "param_groups"}
        if not (isinstance(state, dict) and expected <= state.keys()):
            log.warning("%s: not a saved optimizer state; starting with a fresh optimizer.", path)
            continue
        states[name] = state
    return states
