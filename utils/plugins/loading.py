"""load_plugins: the `plugins` option (a list of "module.Class" names) -> plugin instances.

Every way an entry can be wrong is a ConfigError that names the entry, where it came from, and what to do.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from types import ModuleType

from utils.options.config import ConfigError
from utils.plugins.base import BasePlugin, class_path

log = logging.getLogger(__name__)

# EveryDream2's names of the plugins shipped here. They resolve to ours unless the current directory has a
# module of that name (a copy the user keeps, which then must import our BasePlugin).
ED2_NAMES = {
    "plugins.accumulnator.Accumulnator": "utils.plugins.accumulnator.Accumulnator",
    "plugins.example_plugin.ExampleLoggingPlugin": "utils.plugins.examples.ExampleLoggingPlugin",
}

# EveryDream2 plugins not shipped here, and what to do instead.
ED2_NOT_SHIPPED = {
    "plugins.interruptible": "this trainer saves resumable checkpoints itself (save_every_n_epochs, "
                             "ckpt_every_n_minutes; Ctrl-C saves ckpts/interrupted-gs<step>): remove the entry",
    "plugins.textual_inversion": "it depends on EveryDream2's own train.py and has no equivalent here: remove "
                                 "the entry",
}

IMPORT_HINT = "change `from plugins.plugins import BasePlugin` to `from utils.plugins import BasePlugin`"


def load_plugins(names, where: str) -> list[BasePlugin]:
    """One instance of each named class, in order. `names` is the `plugins` option (None or a list of
    "module.Class" strings); `where` names its source for messages ("train.json", "command line").

    Modules load from the current working directory (added to the front of sys.path if missing) or any
    installed package. Each class must subclass utils.plugins.BasePlugin and is built with no arguments.
    """
    if names is None:
        return []
    if not isinstance(names, (list, tuple)):
        raise ConfigError(f"{where}: 'plugins' must be a list of \"module.Class\" names, e.g. "
                          f"[\"my_plugins.MyPlugin\"]; got {names!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # plugin files written after this process started are found
    return [_load_one(name, where, cwd) for name in names]


def _load_one(name, where: str, cwd: str) -> BasePlugin:
    if not isinstance(name, str):
        raise ConfigError(f"{where}: 'plugins' entries must be \"module.Class\" strings; got {name!r}")
    name = name.strip()
    entry = f"{where}: plugins entry {name!r}"
    module_name, _, class_name = name.rpartition(".")
    if not module_name or not class_name:
        raise ConfigError(f"{entry} is not of the form module.Class (e.g. \"my_plugins.MyPlugin\" for class "
                          f"MyPlugin in my_plugins.py in the directory you start training from, {cwd})")
    module = _import(module_name, name, entry, cwd)
    cls = getattr(module, class_name, None)
    origin = _origin(module)
    if cls is None:
        raise ConfigError(f"{entry}: module {module_name} ({origin}) has no {class_name!r}"
                          f"{_suggest(module, class_name)}")
    if not isinstance(cls, type):
        raise ConfigError(f"{entry}: {class_name} in {origin} is a {type(cls).__name__}, not a class; name a "
                          f"class that subclasses utils.plugins.BasePlugin")
    if not issubclass(cls, BasePlugin):
        other = any(base.__name__ == "BasePlugin" for base in cls.__mro__[1:])
        remove = f", or remove {origin} to use the trainer's own {class_name}" if name in ED2_NAMES else ""
        raise ConfigError(f"{entry}: class {class_name} ({origin}) does not subclass utils.plugins.BasePlugin"
                          f"{' (it subclasses another BasePlugin, e.g. from EveryDream2)' if other else ''}; "
                          f"subclass it: {IMPORT_HINT}{remove}")
    try:
        plugin = cls()
    except ConfigError as e:
        raise ConfigError(f"{entry}: {e}") from e
    except Exception as e:  # noqa: BLE001 - a plugin's constructor can raise anything
        hint = " (plugins are built with no arguments)" if isinstance(e, TypeError) else ""
        raise ConfigError(f"{entry}: creating {class_name}() ({origin}) failed: {type(e).__name__}: {e}"
                          f"{hint}") from e
    log.info("Plugin %s loaded (%s from %s)", name, class_path(cls), origin)
    return plugin


def _import(module_name: str, name: str, entry: str, cwd: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if not _is_module_itself(e, module_name):
            raise _failed_import(entry, module_name, e) from e
        if name in ED2_NAMES:
            ours = ED2_NAMES[name].rpartition(".")[0]
            log.info("%s: no module %s in %s; using the trainer's own %s", entry, module_name, cwd, ED2_NAMES[name])
            return importlib.import_module(ours)
        if module_name in ED2_NOT_SHIPPED:
            raise ConfigError(f"{entry}: {module_name} is an EveryDream2 plugin this trainer does not ship; "
                              f"{ED2_NOT_SHIPPED[module_name]}") from e
        path = module_name.replace(".", os.sep) + ".py"
        raise ConfigError(f"{entry}: no module {module_name!r} in the current directory ({cwd}) or the installed "
                          f"packages; put {path} there (the directory you start training from) or fix the name"
                          + (f" (EveryDream2 plugin names that work here: {', '.join(sorted(ED2_NAMES))})"
                             if module_name.startswith("plugins.") else "")) from e
    except Exception as e:  # noqa: BLE001 - a module can raise anything while it runs
        raise _failed_import(entry, module_name, e) from e


def _is_module_itself(e: ModuleNotFoundError, module_name: str) -> bool:
    """Whether the missing module is `module_name` or a package it is in, not something it imports."""
    return e.name is not None and (e.name == module_name or module_name.startswith(e.name + "."))


def _failed_import(entry: str, module_name: str, e: Exception) -> ConfigError:
    origin = ""
    try:
        spec = importlib.util.find_spec(module_name)
        origin = f" ({spec.origin})" if spec is not None and spec.origin else ""
    except Exception:  # noqa: BLE001 - only used to say where the file is
        pass
    hint = ""
    if isinstance(e, ModuleNotFoundError) and e.name in ("plugins", "plugins.plugins"):
        hint = f"; it is written for EveryDream2: {IMPORT_HINT}"
    return ConfigError(f"{entry}: importing module {module_name}{origin} failed: {type(e).__name__}: {e}{hint}")


def _origin(module: ModuleType) -> str:
    return getattr(module, "__file__", None) or module.__name__


def _suggest(module: ModuleType, class_name: str) -> str:
    classes = [n for n, v in vars(module).items() if isinstance(v, type) and not n.startswith("_")]
    close = difflib.get_close_matches(class_name, classes, n=3, cutoff=0.6)
    if close:
        return f"; did you mean {' or '.join(close)}?"
    plugins = [n for n in classes if issubclass(vars(module)[n], BasePlugin) and vars(module)[n] is not BasePlugin
               and inspect.getmodule(vars(module)[n]) is module]
    if plugins:
        return f"; its plugin classes are {', '.join(plugins)}"
    return "; it defines no subclass of utils.plugins.BasePlugin"
