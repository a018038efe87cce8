"""What caption and config files say about an image (REFERENCE §2.2-§2.4, §2.8 entries).

Every source of an image's settings — a `.txt`/`.caption`/`.yml`/`.yaml`/`.json` sidecar, a folder's
`multiply.txt`/`cond_dropout.txt`/`flip_p.txt`/`local.yaml`/`batch_id.txt`/`loss_scale.txt`/
`shuffle_tags.txt`, an ancestor's `global.yaml`, a manifest entry — is read into one `Settings`: the
values that source sets, None where it sets nothing. `merge` combines sources from least to most
specific and `record_fields` turns the result into ImageRecord fields.

A file that cannot be read, or says something the schema does not allow, raises SettingsError with a
message naming the file, the line where known, and what to write instead. The caller decides what a
bad file costs (scan.py: a bad image sidecar skips its image, a bad folder file is ignored).
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import yaml

from data.captions import caption_from_filename, decode_text, normalize_space, parse_caption_text
from data.records import DEFAULT_BATCH_ID, DEFAULT_MAX_CAPTION_LENGTH, Caption, Tag
from utils.options.values import DEFAULT_MASK_SUFFIX, close_match, encodable, is_number, mask_suffix_problem

# Image sidecars in reading order; a later one wins scalars and the main prompt (§2.2). `.json` is
# read like `.yaml` (issue #4; EveryDream2 reads image-level JSON only in manifests).
TEXT_SIDECARS = (".txt", ".caption")
CONFIG_SIDECARS = (".yml", ".yaml", ".json")
SIDECAR_EXTENSIONS = TEXT_SIDECARS + CONFIG_SIDECARS

# Folder files (§2.4), lower-case names, in the order they are merged (later wins).
FLOAT_FILES = {"multiply.txt": "multiply", "cond_dropout.txt": "cond_dropout",
               "flip_p.txt": "flip_p", "loss_scale.txt": "loss_scale"}
LOCAL_FILES = ("multiply.txt", "cond_dropout.txt", "flip_p.txt", "local.yaml", "local.yml",
               "batch_id.txt", "loss_scale.txt", "shuffle_tags.txt")
GLOBAL_FILES = ("global.yaml", "global.yml")

# §2.3 keys. `image` only means something in a manifest entry; elsewhere it is accepted and unused.
SCHEMA_KEYS = ("main_prompt", "tags", "caption", "rating", "max_caption_length", "multiply",
               "cond_dropout", "flip_p", "shuffle_tags", "batch_id", "loss_scale", "mask_suffix", "image")

# libyaml's parser when PyYAML was built with it: ~10x faster on datasets with a yaml per image.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Notify = Callable[[str, str], None]   # (message, path): a warning about a file that is still used


class SettingsError(ValueError):
    """A caption or config file that cannot be used as written; the message says where and why."""


@dataclass(frozen=True)
class Settings:
    main_prompt: Optional[str] = None
    tags: tuple[Tag, ...] = ()
    rating: Optional[float] = None
    max_caption_length: Optional[int] = None
    multiply: Optional[float] = None
    cond_dropout: Optional[float] = None
    flip_p: Optional[float] = None
    shuffle_tags: Optional[bool] = None
    batch_id: Optional[str] = None
    loss_scale: Optional[float] = None
    mask_suffix: Optional[str] = None


_SCALARS = ("rating", "max_caption_length", "multiply", "cond_dropout", "flip_p", "batch_id",
            "loss_scale", "mask_suffix")


def caption_settings(caption: Caption) -> Settings:
    return Settings(main_prompt=caption.main_prompt or None, tags=caption.tags)


def merge(sources: Sequence[Settings]) -> Settings:
    """Combine sources given from least to most specific (§2.4).

    Scalars and the main prompt: the most specific value that is set wins. shuffle_tags: on if any
    source turns it on. Tags: the union, most specific source first, exact duplicates (same text and
    weight) collapsed, then stably sorted by weight, highest first."""
    values: dict[str, Any] = {}
    main = None
    shuffle = None
    for s in sources:
        if s.main_prompt:
            main = s.main_prompt
        if s.shuffle_tags is not None:
            shuffle = bool(shuffle) or s.shuffle_tags
        for key in _SCALARS:
            value = getattr(s, key)
            if value is not None:
                values[key] = value
    tags: list[Tag] = []
    seen: set[Tag] = set()
    for s in reversed(sources):
        for t in s.tags:
            if t not in seen:
                seen.add(t)
                tags.append(t)
    tags.sort(key=lambda t: -t.weight)
    return Settings(main_prompt=main, tags=tuple(tags), shuffle_tags=shuffle, **values)


def record_fields(settings: Settings, image_path: str) -> dict:
    """ImageRecord keyword arguments for an image with these settings, the result of `merge`.

    The file name supplies the main prompt only when no source did (§2.2); its own tags then join as
    the least specific source. multiply and rating of 0 or unset mean 1 (compat), as do ratings below
    0 (§2.7)."""
    if not settings.main_prompt:
        settings = merge([caption_settings(caption_from_filename(image_path)), settings])
    return dict(
        caption=Caption(settings.main_prompt or "", settings.tags),
        multiply=settings.multiply or 1.0,
        batch_id=settings.batch_id or DEFAULT_BATCH_ID,
        loss_scale=1.0 if settings.loss_scale is None else settings.loss_scale,
        flip_p=settings.flip_p,
        cond_dropout=settings.cond_dropout,
        shuffle_tags=bool(settings.shuffle_tags),
        rating=settings.rating if settings.rating and settings.rating > 0 else 1.0,
        max_caption_length=settings.max_caption_length or DEFAULT_MAX_CAPTION_LENGTH,
    )


# ---------------------------------------------------------------- reading files

def read_file_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return decode_text(f.read())
    except OSError as e:
        raise SettingsError(f"{path}: cannot read ({e.strerror or e}); check its permissions or "
                            f"remove it") from None


def read_sidecar(path: str, notify: Notify, follow_references: bool = True) -> Settings:
    """One caption source: `.txt`/`.caption` as caption text, `.yml`/`.yaml`/`.json` as a §2.3
    mapping. (compat) If a text sidecar's whole text is the path of an existing caption or config
    file, that file is read instead; such references are followed one level only."""
    text = read_file_text(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in TEXT_SIDECARS:
        if not text.strip():
            notify("empty caption file; the caption comes from folder files or the image's file "
                   "name", path)
            return Settings()
        target = _referenced_file(text, path) if follow_references else None
        if target:
            return read_sidecar(target, notify, follow_references=False)
        return caption_settings(parse_caption_text(text))
    return _parse_config_text(text, path, ext, notify, follow_references)


def read_folder_file(path: str, name: str, notify: Notify) -> Settings:
    """A folder-level file (§2.4); `name` is its lower-case file name."""
    if name == "shuffle_tags.txt":
        return Settings(shuffle_tags=True)  # presence alone turns it on; the content is not read
    text = read_file_text(path)
    if name == "batch_id.txt":
        # (compat) EveryDream2 uses the raw text; a trailing newline would then silently make a
        # different group than the same id typed in a yaml, so it is trimmed.
        return Settings(batch_id=normalize_space(text) or None)
    if name in FLOAT_FILES:
        key = FLOAT_FILES[name]
        lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not lines:
            return Settings()
        line_no, value = lines[0]
        where = _Where(path, "", line_no)
        try:
            number = float(value)  # also takes "inf" and "nan", refused next
        except ValueError:
            raise where.error((), f"{_short(value)} is not a number; write a single number such as "
                                  f"{_EXAMPLES[key]}") from None
        if not math.isfinite(number):
            raise where.error((), f"{_short(value)} is not a finite number; write one such as "
                                  f"{_EXAMPLES[key]}")
        if len(lines) > 1:
            raise where.error((), f"expected one number, found {len(lines)} lines")
        return Settings(**{key: _check_number(where, (), key, number, notify)})
    return _parse_config_text(text, path, os.path.splitext(name)[1], notify, True)


def _referenced_file(text: str, referring: str) -> Optional[str]:
    """The caption/config file `text` names, if it is a single line naming an existing one:
    absolute, or relative to the referring file's folder, else to the working directory (compat)."""
    candidate = text.strip()
    if "\n" in candidate or not candidate.lower().endswith(SIDECAR_EXTENSIONS):
        return None
    for path in (os.path.join(os.path.dirname(referring), candidate), candidate):
        if os.path.isfile(path) and os.path.abspath(path) != os.path.abspath(referring):
            return path
    return None


def _parse_config_text(text: str, path: str, ext: str, notify: Notify,
                       follow_references: bool) -> Settings:
    if ext == ".json":
        data = _load_json(text, path)
    else:
        try:
            data = yaml.load(text, Loader=_YAML_LOADER)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise SettingsError(f"{path}{line}: not valid YAML ({problem}); fix the syntax, e.g. "
                                f"quote text that contains ': ' or starts with a special character"
                                ) from None
        except (ValueError, RecursionError) as e:
            raise _unreadable_structure(path, e) from None
    where = _Where(path, text)
    if data is None:
        return Settings()
    if isinstance(data, str):  # a file holding just caption text
        return caption_settings(parse_caption_text(data))
    if not isinstance(data, dict):
        raise where.error((), f"expected a mapping of keys such as main_prompt and tags, got a "
                              f"{_kind(data)}")
    return settings_from_mapping(data, where, notify, follow_references)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _load_json(text: str, path: str) -> Any:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SettingsError(f"{path} line {e.lineno}: not valid JSON ({e.msg}); fix the syntax "
                            f"(quotes around keys and strings, commas between entries)") from None
    except (ValueError, RecursionError) as e:
        raise _unreadable_structure(path, e) from None
    if _SURROGATE_ESCAPE.search(text) and not encodable(data):
        # JSON lets "\ud800" stand alone; such a string is no text, and the tokenizer refuses it.
        raise SettingsError(f"{path}: holds a \\uD800-\\uDFFF escape that is not half of a pair, which "
                            f"is no character; fix or remove it")
    return data


def _unreadable_structure(path: str, error: Exception) -> SettingsError:
    """Well-formed text the parser still cannot turn into values: an integer of thousands of digits
    (Python's limit on converting them), or nesting deeper than Python's stack."""
    return SettingsError(f"{path}: cannot be read ({type(error).__name__}: {str(error)[:120]}); "
                         f"write plain numbers and at most a few levels of nesting")


# ---------------------------------------------------------------- the §2.3 schema

class _Where:
    """Where a mapping came from, to name the file and line in error messages. The line of a key is
    looked up only when an error is raised (composing the yaml again), never on the good path."""

    def __init__(self, path: str, text: str, line: Optional[int] = None,
                 prefix: tuple = (), label: str = ""):
        self.path, self.text, self.line, self.prefix, self.label = path, text, line, prefix, label

    def line_of(self, keys: tuple) -> Optional[int]:
        if self.line is not None:
            return self.line
        try:
            node = yaml.compose(self.text, Loader=yaml.SafeLoader)
            for key in self.prefix + keys:
                if isinstance(node, yaml.MappingNode):
                    node = next(v for k, v in node.value if k.value == key)
                elif isinstance(node, yaml.SequenceNode):
                    node = node.value[key]
            return node.start_mark.line + 1
        except Exception:  # noqa: BLE001 - no line is better than hiding the real error
            return None

    def name(self, keys: tuple = ()) -> str:
        line = self.line_of(keys)
        return f"{self.path}{f' line {line}' if line else ''}{self.label}"

    def error(self, keys: tuple, message: str) -> SettingsError:
        key = f" key '{keys[0]}'" if keys else ""
        return SettingsError(f"{self.name(keys)}:{key} {message}")


_EXAMPLES = {"rating": "2.0", "max_caption_length": "300", "multiply": "2.5",
             "cond_dropout": "0.1", "flip_p": "0.5", "loss_scale": "0.8"}


def _kind(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "text", bool: "true/false"}.get(
        type(value), type(value).__name__)


_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxdict, _QUOTE.maxstring, _QUOTE.maxother = 2, 4, 4, 60, 60


def _short(value: Any) -> str:
    """A value as an error message quotes it: cut short, however large (yaml aliases can make a
    list of billions of items in a few lines), and no digits of a huge integer (Python refuses to
    print one of thousands of digits)."""
    if isinstance(value, int) and value.bit_length() > 1000:
        return "a huge integer"
    return _QUOTE.repr(value)


def _number(where: _Where, keys: tuple, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(keys, f"must be a number such as {_EXAMPLES.get(keys[0], '1.0')}, got "
                                f"{_kind(value)} {_short(value)}")
    if not is_number(value):  # NaN, Infinity, or an integer too big for a float
        raise where.error(keys, f"must be a finite number, got {_short(value)}")
    return float(value)


def _check_number(where: _Where, keys: tuple, key: str, value: float, notify: Notify):
    """Range rules shared by yaml keys and the single-number folder files."""
    if key in ("cond_dropout", "flip_p") and not 0 <= value <= 1:
        raise where.error(keys, f"{value} is a probability and must be between 0 and 1")
    if key == "multiply":
        if value < 0:
            raise where.error(keys, f"{value} is negative; use a number of repeats per epoch such "
                                    f"as 0.5 or 3")
        if value == 0:
            notify("multiply 0 means 1 (EveryDream2 compatibility); remove an image from the "
                   "folder to leave it out", where.name(keys))
            return None
    if key == "max_caption_length":
        if value != int(value) or value < 1:
            raise where.error(keys, f"must be a whole number of characters (at least 1), got "
                                    f"{value}")
        return int(value)
    return value


def _text(where: _Where, keys: tuple, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise where.error(keys, f"must be text, got {_kind(value)} {_short(value)}")
    return normalize_space(str(value))


def _tags(where: _Where, value: Any) -> tuple[Tag, ...]:
    if isinstance(value, str):  # `tags: "a, b"`: the same as a caption's tag list
        return tuple(Tag(t) for t in (normalize_space(p) for p in value.split(",")) if t)
    if not isinstance(value, list):
        raise where.error(("tags",), f"must be a list of tags, got {_kind(value)}; write\n"
                                     f"tags:\n  - tag one\n  - tag: tag two\n    weight: 1.5")
    tags = []
    for i, item in enumerate(value):
        keys = ("tags", i)
        if isinstance(item, dict):
            unknown = set(item) - {"tag", "weight"}
            if "tag" not in item or unknown:
                raise where.error(keys, f"entry {i + 1} must have a 'tag' and optionally a 'weight', "
                                        f"got keys {sorted(map(str, item))}")
            text = _text(where, keys + ("tag",), item["tag"])
            weight = 1.0 if item.get("weight") is None else _number(
                where, keys + ("weight",), item["weight"])
            if weight <= 0:
                raise where.error(keys + ("weight",), f"tag '{text}' has weight {weight}; weights "
                                                      f"must be above 0 (1.0 is the default)")
        else:
            text, weight = _text(where, keys, item), 1.0
        if text:
            tags.append(Tag(text, weight))
    return tuple(tags)


def settings_from_mapping(data: dict, where: _Where, notify: Notify,
                          follow_references: bool = True, depth: int = 0) -> Settings:
    """A §2.3 mapping (yaml/json sidecar, folder yaml, manifest entry) as Settings.

    `caption` (text, a path to a caption/config file, or a mapping) is read like a sidecar and merged
    over the mapping's other keys. Unknown keys are ignored with a warning suggesting the key that was
    probably meant (the documented typo `cond_droput` is such a key)."""
    values: dict[str, Any] = {}
    for key, value in data.items():
        keys = (key,)
        if key not in SCHEMA_KEYS:
            close = close_match(str(key), SCHEMA_KEYS, cutoff=0.7)
            hint = f" (did you mean '{close}'?)" if close else ""
            notify(f"unknown key '{key}' ignored{hint}", where.path)
            continue
        if value is None or key in ("image", "caption"):
            continue
        if key == "main_prompt":
            prompts = value if isinstance(value, list) else [value]
            prompts = [p for p in (_text(where, keys, p) for p in prompts) if p]
            if len(prompts) > 1:
                notify(f"main_prompt has {len(prompts)} values; only the first, '{prompts[0]}', is "
                       f"used", where.name(keys))
            values["main_prompt"] = prompts[0] if prompts else None
        elif key == "tags":
            values["tags"] = _tags(where, value)
        elif key == "shuffle_tags":
            if not isinstance(value, bool):
                raise where.error(keys, f"must be true or false, got {_short(value)}")
            values["shuffle_tags"] = value
        elif key == "batch_id":
            values["batch_id"] = _text(where, keys, value) or None
        elif key == "mask_suffix":
            problem = mask_suffix_problem(value) if isinstance(value, str) else \
                f"must be text such as {DEFAULT_MASK_SUFFIX}, got {_kind(value)} {_short(value)}"
            if problem:
                raise where.error(keys, problem)
            values["mask_suffix"] = value
        else:
            values[key] = _check_number(where, keys, key, _number(where, keys, value), notify)
    own = Settings(**values)
    caption = data.get("caption")
    if caption is None:
        return own
    return merge([own, _caption_value(caption, where, notify, follow_references, depth)])


# `caption` mappings nested deeper than this are refused: a yaml alias can make one contain itself.
MAX_CAPTION_NESTING = 8


def _caption_value(value: Any, where: _Where, notify: Notify, follow_references: bool,
                   depth: int) -> Settings:
    if isinstance(value, dict):
        if depth >= MAX_CAPTION_NESTING:
            raise where.error(("caption",), f"mappings nest more than {MAX_CAPTION_NESTING} deep "
                                            f"(a yaml alias that refers to itself?); write the caption "
                                            f"out once")
        return settings_from_mapping(value, where, notify, follow_references=False, depth=depth + 1)
    if not isinstance(value, str):
        raise where.error(("caption",), f"must be caption text, a caption file's path or a mapping, "
                                        f"got {_kind(value)}")
    target = _referenced_file(value, where.path) if follow_references else None
    if target:
        return read_sidecar(target, notify, follow_references=False)
    return caption_settings(parse_caption_text(value))


def read_manifest(path: str) -> tuple[str, list]:
    """(text, entries) of a manifest file (§2.8): a JSON array of §2.3 mappings with `image` keys.
    A manifest that cannot be used at all raises SettingsError."""
    text = read_file_text(path)
    entries = _load_json(text, path)
    if not isinstance(entries, list):
        raise SettingsError(f"{path}: a data_root manifest must be a JSON array of entries such as "
                            f'{{"image": "images/cat.jpg", "main_prompt": "a cat"}}, got a '
                            f"{_kind(entries)}")
    return text, entries


def manifest_entry(entry: Any, index: int, path: str, text: str, notify: Notify
                   ) -> tuple[Optional[str], Settings]:
    """(image path as written, settings) of manifest entry `index` (0-based)."""
    where = _Where(path, text, prefix=(index,), label=f" (entry {index + 1})")
    if not isinstance(entry, dict):
        raise where.error((), f"each entry must be a mapping with an 'image' key, got {_kind(entry)}")
    image = entry.get("image")
    if image is not None and not isinstance(image, str):
        raise where.error(("image",), f"must be the image's path as text, got {_kind(image)}")
    return image, settings_from_mapping(entry, where, notify)
