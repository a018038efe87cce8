"""Options: the flag registry (utils/options/flags.py) turned into argparse, the JSON merge and validation.

Precedence is command line > `--config` JSON > registry default. A JSON `null` means "use the default".
Everything here runs before any model or dataset is touched, and a bad option stops the run with a message
that names the key, the file and the fix, before any output folder exists.

`python -m utils.options.config` prints the markdown flag table kept in doc/FLAGS.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import random
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from utils.options.flags import ALIASES, BY_NAME, BUCKET_RESOLUTIONS, FLAGS, LEGACY_KEYS, Flag
from utils.options.values import ConfigError, boolean, encodable, integer, mask_suffix_problem, number, string, \
    strings, unknown_key

log = logging.getLogger(__name__)


LIVE_KEYS = tuple(flag.name for flag in FLAGS if flag.live)


def _type_name(flag: Flag) -> str:
    return {bool: "true/false", int: "integer", float: "number", str: "string", list: "list of strings",
            object: "JSON value"}[flag.type]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune Stable Diffusion 1.x / 2.x. Options come from --config JSON, overridden by flags. "
                    "See doc/FLAGS.md.",
        argument_default=argparse.SUPPRESS,  # so we know which flags the user actually gave
    )
    parser.add_argument("--config", help="train.json with any of the options below (command-line flags win)")
    for flag in FLAGS:
        help_text = (flag.help + ("" if flag.default is None else f" (default: {flag.default})")).replace("%", "%%")
        names = [f"--{name}" for name in (flag.name, *flag.aliases)]
        if flag.type is bool:
            parser.add_argument(*names, dest=flag.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif flag.type is object:
            parser.add_argument(*names, dest=flag.name, type=_json_or_text, metavar="VALUE", help=help_text)
        elif flag.type is list:
            parser.add_argument(*names, dest=flag.name, nargs="+", metavar="NAME", help=help_text)
        else:
            parser.add_argument(*names, dest=flag.name, type=flag.type, choices=flag.choices, help=help_text)
    legacy = parser.add_argument_group("EveryDream2 switches kept so old command lines run (each is ignored, with "
                                       "a note saying what replaces it)")
    for key in LEGACY_KEYS.values():
        legacy.add_argument(f"--{key.name}", dest=_LEGACY_DEST + key.name, action=argparse.BooleanOptionalAction,
                            help=key.note.replace("%", "%%"))
    return parser


def _json_or_text(text: str) -> Any:
    """A free-form option's command-line value: JSON (a number, list, object), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


_LEGACY_DEST = "legacy:"  # argparse destination prefix of the EveryDream2 switches, kept apart from the options


def read_json_object(path: Path, missing: str, expected: str) -> dict:
    """Reads a JSON file holding one object; every problem is a ConfigError naming the file and the fix.

    `missing` says what to do when the file is absent, `expected` what the object should hold.
    """
    if not os.path.isfile(path):  # unlike Path.is_file, also False for a name too long to look up
        raise ConfigError(f"{path}: not found. {missing}")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # editors on Windows may start the file with a BOM
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e}). Check its permissions.") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}). Save it as UTF-8 JSON.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). "
                          "Fix the syntax, e.g. a missing comma or a trailing comma.") from None
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits; nesting deeper than Python's stack
        raise ConfigError(f"{path}: JSON that cannot be read ({type(e).__name__}: {str(e)[:200]}). Write plain "
                          "numbers and at most a few levels of nesting.") from None
    if "\\u" in text and not encodable(data):
        # JSON lets "\ud800" stand alone; such a string is no text, and no file name, log or TensorBoard tag takes it.
        raise ConfigError(f"{path}: holds a \\uD800-\\uDFFF escape that is not half of a pair, which is no character. "
                          "Fix or remove it.")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of {expected}, got {type(data).__name__}.")
    return data


_CHECKS = {bool: boolean, int: integer, float: number, str: string, list: strings}


def _coerce(flag: Flag, value: Any, where: str) -> Any:
    """Checks a JSON value's type; ints are fine where numbers are expected."""
    if value is None or flag.type is object:
        return value
    return _CHECKS[flag.type](where, flag.name, value)


def _check_range(flag: Flag, value: Any, where: str) -> None:
    if value is None:
        return
    if flag.type is float:  # JSON NaN/Infinity, or `--lr nan`
        number(where, flag.name, value)
    if flag.choices and value not in flag.choices:
        raise ConfigError(f"{where}: key '{flag.name}' is {value!r}; choose one of: {', '.join(flag.choices)}.")
    if flag.min is not None and value < flag.min:
        raise ConfigError(f"{where}: key '{flag.name}' is {value}; it must be at least {flag.min}.")
    if flag.max is not None and value > flag.max:
        raise ConfigError(f"{where}: key '{flag.name}' is {value}; it must be at most {flag.max}.")


def _read_config_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The --config JSON as checked option values (aliases under the option's name), and the EveryDream2 legacy
    keys it sets apart (LEGACY_KEYS: ignored, noted by `load`)."""
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # option name -> the key the file gave it under
    legacy: dict[str, Any] = {}
    for key, value in read_json_object(path, "Check the --config path.", "option names to values").items():
        if key in LEGACY_KEYS:
            legacy[key] = value
            continue
        name = ALIASES.get(key, key)
        if name not in BY_NAME:
            raise unknown_key(str(path), key, list(BY_NAME) + list(ALIASES) + list(LEGACY_KEYS),
                              otherwise=" See doc/FLAGS.md for the list of options.")
        if name == "data_root" and isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: 'data_root' as a resolver object or list (EveryDream2's "
                              "{\"resolver\": ...} form) is not supported. Give one folder, or list the images "
                              "of several folders in a manifest .json (doc/DATA.md).")
        value = _coerce(BY_NAME[name], value, str(path))
        _check_range(BY_NAME[name], value, str(path))
        if name in spelled and value is not None and values[name] is not None and value != values[name]:
            raise ConfigError(f"{path}: '{spelled[name]}' and '{key}' are two names of one option and are set to "
                              f"different values ({json.dumps(values[name])}, {json.dumps(value)}). Keep one.")
        if name not in spelled or value is not None:
            values[name], spelled[name] = value, key
    return values, legacy


def _legacy_notes(file_legacy: dict[str, Any], cli_legacy: dict[str, Any], config_path: str | None) -> list[str]:
    """One note per EveryDream2 legacy key given (the command line's value where both give it)."""
    notes = []
    for key in LEGACY_KEYS.values():
        if key.name in cli_legacy:
            where, value = f"command line: '--{key.name}'", cli_legacy[key.name]
        elif key.name in file_legacy:
            where, value = f"{config_path}: '{key.name}'", file_legacy[key.name]
        else:
            continue
        note = key.note_for(value)
        if note:
            notes.append(f"{where} is an EveryDream2 switch, {note}.")
    return notes


def load(argv: list[str] | None = None) -> SimpleNamespace:
    """Parses the command line and the --config file into validated options (no heavy imports, no side effects)."""
    cli = vars(build_parser().parse_args(argv))
    config_path = cli.pop("config", None)
    cli_legacy = {key[len(_LEGACY_DEST):]: cli.pop(key) for key in list(cli) if key.startswith(_LEGACY_DEST)}
    file_values, file_legacy = _read_config_file(Path(config_path)) if config_path else ({}, {})
    notes = _legacy_notes(file_legacy, cli_legacy, config_path)
    values = {**file_values, **cli}
    sources = {**{key: config_path for key in file_values}, **{key: "command line" for key in cli}}

    opts = {}
    for flag in FLAGS:
        value = values.get(flag.name)
        _check_range(flag, value, sources.get(flag.name, "defaults"))
        opts[flag.name] = flag.default if value is None else value
    args = SimpleNamespace(**opts, config=config_path, sources=sources, notes=notes, file_values=file_values)
    _validate(args)
    _derive(args)
    return args


def reload_live_settings(args: SimpleNamespace, max_clip_skip: int) -> tuple[list[str], list[str]]:
    """Re-reads the --config file mid-run (load_settings_every_epoch) and applies the options marked live.

    Returns (changes applied, warnings), one line each. Nothing here raises: a file caught half-saved, invalid
    or gone keeps every current setting, so a run never dies because its config was being edited. A live option
    also given on the command line keeps the command-line value, as at startup.
    """
    path = Path(args.config)
    try:
        file_values, _ = _read_config_file(path)
        clip_skip = file_values.get("clip_skip")
        if clip_skip is not None and clip_skip > max_clip_skip:
            raise ConfigError(f"{path}: clip_skip {clip_skip} reaches past the text encoder's {max_clip_skip} layers.")
    except (ConfigError, OSError, UnicodeDecodeError) as e:
        return [], [f"Settings not reloaded, keeping the previous ones: {e}"]

    changes, warnings = [], []
    for flag in FLAGS:
        new = file_values.get(flag.name)
        if new == args.file_values.get(flag.name):
            continue
        args.file_values[flag.name] = new
        if not flag.live:
            warnings.append(f"{path}: '{flag.name}' changed to {json.dumps(new)}, but only applies when the run is "
                            f"restarted; ignored. Options that apply at the next epoch: {', '.join(LIVE_KEYS)}.")
        elif args.sources.get(flag.name) == "command line":
            warnings.append(f"{path}: '{flag.name}' changed to {json.dumps(new)}; the command line's "
                            f"{json.dumps(getattr(args, flag.name))} stays in force.")
        else:
            value = flag.default if new is None else new
            if flag.name == "save_every_n_epochs" and value is not None and value < 1:
                value = None
            changes.append(f"{path}: {flag.name} {json.dumps(getattr(args, flag.name))} -> {json.dumps(value)}")
            setattr(args, flag.name, value)
    return changes, warnings


# A Hugging Face model id: `owner/name`, as EveryDream2 configs give resume_ckpt (it downloaded them).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def missing_model(where: str, key: str, value: str, fix: str) -> str:
    """The message for a model path that does not exist. EveryDream2 also took a Hugging Face id (and downloaded
    it) and a bare name (looked up in its ckpt_cache folder): those get the way to do it by hand."""
    if _HUB_ID.fullmatch(value) and not value.lower().endswith((".safetensors", ".ckpt")):
        folder = f"models/{value.split('/')[1]}"
        return (f"{where}: {key} '{value}' is not a file or folder on this machine (looked in {os.getcwd()}). If it "
                f"is a Hugging Face model id: nothing is downloaded by this trainer. Download the model by hand, e.g. "
                f"from https://huggingface.co/{value}, either a `.safetensors` single file or the whole diffusers "
                f"folder with `hf download {value} --local-dir {folder}` (`huggingface-cli download {value} "
                f"--local-dir {folder}` with huggingface_hub before 1.0), then set {key} to that file or folder "
                f"(here: {folder}).")
    if os.sep not in value and "/" not in value:
        return (f"{where}: {key} '{value}' does not exist in the working directory ({os.getcwd()}). EveryDream2 "
                f"also looked a bare name up in its own ckpt_cache folder (ckpt_cache/{value}, the "
                f"diffusers copy it converted a .ckpt into); this trainer does not: set {key} to the full path of "
                f"that folder or of the model file. {fix}")
    return f"{where}: {key} '{value}' does not exist. {fix}"


def _where(args: SimpleNamespace, key: str) -> str:
    return args.sources.get(key, "defaults")


def _vram_setting(value: Any, where: str) -> str | float:
    """"auto", "off" or a number of GiB > 0 (JSON may give the number as a string)."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "off"):
        return value.strip().lower()
    try:
        gib = float(value)
    except (TypeError, ValueError, OverflowError):
        gib = math.nan
    if isinstance(value, bool) or not math.isfinite(gib) or gib <= 0:
        raise ConfigError(f"{where}: key 'vram' is {json.dumps(value)}; give \"auto\" (the GPU's free memory), a "
                          "number of GiB such as 8, or \"off\".")
    return gib


def _validate(args: SimpleNamespace) -> None:
    if args.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"{_where(args, 'wandb')}: wandb is on but the wandb package is not installed. Install it "
                          f"(`pip install wandb`, then `wandb login`) or turn wandb off.")
    args.vram = _vram_setting(args.vram, _where(args, "vram"))
    if args.fused_backward and args.clip_grad_norm:
        raise ConfigError(f"{_where(args, 'fused_backward')}: fused_backward updates each weight as its gradient "
                          "arrives, before the whole gradient's norm is known, so clip_grad_norm "
                          f"({args.clip_grad_norm:g}, {_where(args, 'clip_grad_norm')}) cannot be applied. Turn one "
                          "of them off.")
    for key in ("fused_backward", "bf16_weights"):
        if getattr(args, key) and args.mixed_precision == "fp16":
            raise ConfigError(f"{_where(args, key)}: {key} does not work with fp16 mixed precision (its grad scaler "
                              "must see every gradient before any update). Use mixed_precision bf16 or auto.")
    for key in ("resume_ckpt", "data_root"):
        if getattr(args, key) in (None, ""):
            raise ConfigError(f"'{key}' is required: set it in your --config JSON or pass --{key}.")
    # os.path rather than Path: False, not an exception, for names too long for the OS to look up
    if args.resume_ckpt != "findlast" and not os.path.exists(args.resume_ckpt):
        raise ConfigError(missing_model(_where(args, "resume_ckpt"), "resume_ckpt", args.resume_ckpt,
                                        "Give a diffusers model folder or a .safetensors/.ckpt file on this machine, "
                                        "or `findlast`."))
    if os.path.isfile(args.resume_ckpt) and Path(args.resume_ckpt).suffix.lower() not in (".safetensors", ".ckpt"):
        raise ConfigError(f"{_where(args, 'resume_ckpt')}: resume_ckpt '{args.resume_ckpt}' is a file but not a "
                          ".safetensors or .ckpt checkpoint. Give one of those, or a diffusers model folder.")
    data_root = args.data_root
    if not (os.path.isdir(data_root) or os.path.isfile(data_root) and data_root.lower().endswith(".json")):
        raise ConfigError(f"{_where(args, 'data_root')}: data_root '{args.data_root}' is neither a folder nor a "
                          "manifest .json file. Point it at the folder that holds your training images and caption "
                          "files (see doc/DATA.md).")
    if problem := mask_suffix_problem(args.mask_suffix):
        raise ConfigError(f"{_where(args, 'mask_suffix')}: mask_suffix {problem}.")
    if args.resolution % 64:
        raise ConfigError(f"{_where(args, 'resolution')}: resolution {args.resolution} is not a multiple of 64. "
                          f"Use one of {', '.join(map(str, BUCKET_RESOLUTIONS))}.")
    if not 512 <= args.resolution <= 1024:
        args.notes.append(f"resolution {args.resolution} is outside 512..1024, the range SD 1.x/2.x models were "
                          "trained near; expect to retune the learning rate (fine for tiny test models).")
    if args.disable_amp and args.mixed_precision in ("bf16", "fp16"):
        raise ConfigError(f"disable_amp ({_where(args, 'disable_amp')}) turns mixed precision off, but mixed_precision "
                          f"is '{args.mixed_precision}' ({_where(args, 'mixed_precision')}). Keep one of them.")
    if args.disable_unet_training and args.disable_textenc_training:
        raise ConfigError("disable_unet_training and disable_textenc_training are both set: nothing would be trained. "
                          "Unset one of them.")
    if args.timestep_start >= args.timestep_end:
        raise ConfigError(f"timestep_start ({args.timestep_start}) must be below timestep_end ({args.timestep_end}).")
    custom_optimizer_file = args.optimizer_config != BY_NAME["optimizer_config"].default
    if custom_optimizer_file and not os.path.isfile(args.optimizer_config):
        raise ConfigError(f"{_where(args, 'optimizer_config')}: optimizer_config '{args.optimizer_config}' not found "
                          "(paths are relative to the working directory). Fix the path or remove the key to use "
                          "the defaults.")
    if args.attn_type == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ConfigError(f"{_where(args, 'attn_type')}: attn_type 'xformers' needs the xformers package, which "
                          "is not installed. Use attn_type 'sdp' (faster on PyTorch 2) or pip install xformers.")


def _derive(args: SimpleNamespace) -> None:
    """Fills the values that depend on others, as EveryDream2 users expect (REFERENCE.md §1.1 step 5)."""
    args.amp = not args.disable_amp and args.mixed_precision != "no"
    args.eight_bit_states = False  # a memory plan may switch adamw / lion to their 8-bit forms (doc/MEMORY.md)
    if args.seed == -1:
        args.seed = random.randint(0, 2**30)
        args.notes.append(f"seed -1: using random seed {args.seed}")
    if args.save_every_n_epochs is None and args.ckpt_every_n_minutes is None:
        args.ckpt_every_n_minutes = 20.0
    if args.save_every_n_epochs is not None and args.save_every_n_epochs < 1:
        args.save_every_n_epochs = None
    if args.ckpt_every_n_minutes is not None and args.ckpt_every_n_minutes <= 0:
        args.ckpt_every_n_minutes = None
    if args.load_settings_every_epoch and not args.config:
        args.notes.append("load_settings_every_epoch: there is no --config file to re-read, so nothing will change "
                          "during the run.")
    if args.cond_dropout > 0.26:
        args.notes.append(f"cond_dropout {args.cond_dropout} is high; values above 0.26 may hurt prompt following.")


def effective_options(args: SimpleNamespace) -> dict:
    """The options as they apply, for the run's JSON copy and the TensorBoard config text."""
    return {flag.name: getattr(args, flag.name) for flag in FLAGS}


def flag_table_markdown() -> str:
    lines = ["# Options", "",
             "Generated from `utils/options/flags.py` by `python -m utils.options.config > doc/FLAGS.md`; do not edit by hand.", "",
             "Every option works as a `train.json` key and as a command-line flag (`--name value`; switches are "
             "`--name` / `--no-name`). The command line wins over the JSON file; a JSON `null` means the default.",
             ""]
    group = None
    for flag in FLAGS:
        if flag.group != group:
            group = flag.group
            lines += ["", f"## {group}", "", "| option | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        allowed = ", ".join(flag.choices) if flag.choices else " ".join(
            part for part in (f">= {flag.min:g}" if flag.min is not None else "",
                              f"<= {flag.max:g}" if flag.max is not None else "") if part)
        default = "unset" if flag.default is None else f"`{json.dumps(flag.default)}`"
        meaning = flag.help + (" *Live: with `load_settings_every_epoch`, an edit applies at the next epoch.*" if flag.live else "") + \
            "".join(f" Also accepted as `{alias}`." for alias in flag.aliases)
        lines.append(f"| `{flag.name}` | {_type_name(flag)} | {default} | {allowed} | {meaning} |")
    lines += ["", "## Legacy: EveryDream2 names", "",
              "Accepted in `train.json` and on the command line so EveryDream2 configs and command lines run "
              "unchanged. A legacy switch set to true (`\"amp\": true`, `--amp`) is ignored with one note at start "
              "saying what replaces it; `false` or `null` is ignored silently (except `amp`: false, which is noted).",
              "", "| key | command line | what it does here |", "|---|---|---|"]
    lines += [f"| `{key.name}` | `--{key.name}`, `--no-{key.name}` | {key.note[0].upper()}{key.note[1:]}." +
              (f" `false`: {key.note_if_false}." if key.note_if_false else "") + " |" for key in LEGACY_KEYS.values()]
    lines += [f"| `{alias}` | `--{alias}` | Another name of `{name}` (EveryDream2's documentation uses it). |"
              for alias, name in ALIASES.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(flag_table_markdown())
