"""Checks for single JSON values, shared by every settings file: train.json, the validation, sample and optimizer
files.

Each check takes `where` (the file, or the file and the entry, the value came from), the key and the value; it
returns the value as the caller should use it, or raises ConfigError with a message that names where, the key and
what a valid value is. `is_number` and `is_whole` are the bare tests, for callers that word their own message.
`did_you_mean` and `unknown_key` answer a key that is not one of the known ones with the one probably meant;
`check_section` checks a JSON object of settings against a table of such tests.

Only the standard library is imported here, so any module can use these without an import cycle.
"""
from __future__ import annotations

import difflib
import json
import logging
import sys
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """A problem with the user's options; the message says where and how to fix it."""


# -- names ---------------------------------------------------------------------------------------------------------

def close_match(word: str, options: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The option `word` is most likely a typo of, or None when none is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(word: str, options: Iterable[str], otherwise: str = "") -> str:
    """" Did you mean 'x'?" for the option closest to `word`, else `otherwise`: the end of an "unknown" message."""
    match = close_match(word, options)
    return f" Did you mean '{match}'?" if match else otherwise


def unknown_key(where: str, key: str, known: Iterable[str], *, shown: str | None = None,
                otherwise: str | None = None) -> ConfigError:
    """The error for `key`, which is not one of `known`: it suggests the closest known key, or else says
    `otherwise` (by default, lists the known keys). `shown` is the key as the message names it, e.g.
    "base.optimiser" for the key "optimiser" of the section "base"."""
    known = list(known)
    if otherwise is None:
        otherwise = f" Valid keys: {', '.join(known)}."
    return ConfigError(f"{where}: unknown key '{shown or key}'.{did_you_mean(key, known, otherwise)}")


def check_section(where: str, section: str, settings: Mapping[str, Any],
                  checks: Mapping[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Checks each key of the JSON object `section` against `checks`: key -> (test, what a valid value is). A
    null passes every test (it means the default). Messages name the key as "section.key"."""
    for key, value in settings.items():
        if key not in checks:
            raise unknown_key(where, key, checks, shown=f"{section}.{key}")
        test, expected = checks[key]
        if value is not None and not test(value):
            raise ConfigError(f"{where}: {section}.{key} must be {expected}, got {value!r}.")


# -- text --------------------------------------------------------------------------------------------------------

def encodable(data: Any) -> bool:
    """False when a string in `data` holds half of a surrogate pair (JSON's lone "\\ud800"): no text, file name,
    log or tokenizer takes it."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def string(where: str, key: str, value: Any) -> str:
    """A string; a NUL character in it is refused, as no file name or text can hold one."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: key '{key}' must be a string, got {json.dumps(value)}.")
    if "\x00" in value:
        raise ConfigError(f"{where}: key '{key}' is {json.dumps(value)}, which holds a NUL character: no file name "
                          "or text can. Retype the value.")
    return value


# A loss mask beside image NAME.jpg is NAME<suffix>.png (doc/DATA.md, Masks): OneTrainer's name is the mask_suffix
# flag's default; a folder's local.yaml or global.yaml may name another, held to the same rule.
DEFAULT_MASK_SUFFIX = "-masklabel"


def mask_suffix_problem(suffix: str) -> str | None:
    """Why `suffix` cannot end a mask's file name (before its extension), or None."""
    if not suffix:
        return ("must not be empty: a mask needs a name of its own, NAME<suffix>.png beside NAME.jpg (e.g. "
                f"{DEFAULT_MASK_SUFFIX})")
    if "/" in suffix or "\\" in suffix:
        return f"'{suffix}' holds a path separator: a mask lies in its image's folder, named NAME<suffix>.png"
    return None


def strings(where: str, key: str, value: Any) -> list[str]:
    """A list of strings (e.g. `["my_plugins.Counter"]`)."""
    if not isinstance(value, list):
        raise ConfigError(f"{where}: key '{key}' must be a list of strings, e.g. [\"a\", \"b\"], got "
                          f"{json.dumps(value)}.")
    return [string(where, f"{key}[{i}]", item) for i, item in enumerate(value)]


# -- true/false --------------------------------------------------------------------------------------------------

def boolean(where: str, key: str, value: Any, *, quoted: bool = False) -> bool:
    """true or false. With `quoted`, also the strings "true" and "false", with a warning: EveryDream2 counts any
    truthy value, so "false" (a string) would switch the feature on there; here it is taken at its word rather
    than silently the opposite of what it says."""
    if isinstance(value, bool):
        return value
    if quoted and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        meant = value.strip().lower() == "true"
        log.warning("%s: '%s' is the string %s; taking it as %s. Write %s without quotes.", where, key,
                    json.dumps(value), json.dumps(meant), json.dumps(meant))
        return meant
    raise ConfigError(f"{where}: key '{key}' must be true or false, got {json.dumps(value)}.")


# -- numbers -----------------------------------------------------------------------------------------------------

def is_number(value: Any) -> bool:
    """A finite JSON number: not true/false, and not NaN, Infinity (Python's json reads both) or an integer too
    large for a float."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


def is_whole(value: Any) -> bool:
    """A finite number without a fraction (2 and 2.0, not 2.5)."""
    return is_number(value) and float(value).is_integer()


def number(where: str, key: str, value: Any) -> float:
    """A finite number, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: key '{key}' must be a number, got {json.dumps(value)}.")
    if not is_number(value):
        raise ConfigError(f"{where}: key '{key}' is {json.dumps(value)}; it must be a finite number.")
    return float(value)


def integer(where: str, key: str, value: Any, minimum: int | None = None, why: str = "") -> int:
    """A whole number (2.0 counts as 2), at least `minimum` when given; `why` explains the minimum."""
    if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
        raise ConfigError(f"{where}: key '{key}' must be a whole number, got {json.dumps(value)}.")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: key '{key}' is {int(value)}; it must be at least {minimum}"
                          f"{f' ({why})' if why else ''}.")
    return int(value)


def proportion(where: str, key: str, value: Any, example: str = "") -> float:
    """A fraction strictly between 0 and 1; `example` says what one means, e.g. "0.15 = 15% of the images"."""
    p = number(where, key, value)
    if not 0 < p < 1:
        raise ConfigError(f"{where}: key '{key}' is {json.dumps(value)}; it must be a fraction above 0 and below 1"
                          f"{f' ({example})' if example else ''}.")
    return p
