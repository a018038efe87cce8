"""The run's options, checked before any model or dataset is touched.

- `flags`: the flag registry, one entry per option (type, default, range, help, live or not).
- `config`: the command line and the `--config` JSON merged and validated (`load`), the options marked live
  re-read between epochs (`reload_live_settings`, `LIVE_KEYS`), the options as they apply (`effective_options`)
  and the JSON-object file reader every settings file uses (`read_json_object`).
- `values`: the checks of single JSON values (`boolean`, `integer`, `number`, `proportion`, `string`, ...) and
  the "did you mean" answer to an unknown key, each raising `ConfigError` with a message that names the file,
  the key and the fix.
"""
import importlib

from utils.options.values import (ConfigError, boolean, check_section, close_match, did_you_mean, encodable, integer,
                                  is_number, is_whole, number, proportion, string, unknown_key)

# config's names are imported when first asked for, not with the package: `python -m utils.options.config` (which
# writes doc/FLAGS.md) would otherwise find the module already imported and warn, and data/, which only needs the
# value checks, does not load the option registry and argparse.
_FROM_CONFIG = ("LIVE_KEYS", "effective_options", "load", "read_json_object", "reload_live_settings")


def __getattr__(name: str):
    if name in _FROM_CONFIG:
        return getattr(importlib.import_module("utils.options.config"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConfigError", "LIVE_KEYS", "boolean", "check_section", "close_match", "did_you_mean", "effective_options",
           "encodable", "integer", "is_number", "is_whole", "load", "number", "proportion", "read_json_object",
           "reload_live_settings", "string", "unknown_key"]
