"""BasePlugin (what a plugin subclasses), PluginError, and PluginRunner (calls every plugin's hook in turn).

The hooks and their keyword arguments are listed in doc/PLUGINS.md. The interface is EveryDream2's, so one
of its plugins works here once its import reads `from utils.plugins import BasePlugin`.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

EVENT_HOOKS = ("on_training_start", "on_training_end", "on_epoch_start", "on_epoch_end",
               "on_step_start", "on_step_end", "on_samples_rendered")
TRANSFORM_HOOKS = ("transform_caption", "transform_pil_image")

# A call slower than this many seconds logs a warning naming the plugin and hook (REFERENCE §8.2).
SLOW_HOOK_SECONDS = {
    "on_training_start": 20.0,
    "on_training_end": 20.0,
    "on_epoch_start": 5.0,
    "on_epoch_end": 5.0,
    "on_step_start": 0.5,
    "on_step_end": 0.5,
    "on_samples_rendered": 20.0,
    "transform_caption": 0.5,
    "transform_pil_image": 0.5,
}


class BasePlugin:
    """Subclass this and override the hooks you need; every hook here does nothing.

    Event hooks get keyword arguments only (doc/PLUGINS.md lists them per hook); accept `**kwargs` so that
    arguments added later do not break the plugin. The two transforms run in the data-loader workers.
    """

    def on_training_start(self, **kwargs) -> None:
        pass

    def on_training_end(self, **kwargs) -> None:
        pass

    def on_epoch_start(self, **kwargs) -> None:
        pass

    def on_epoch_end(self, **kwargs) -> None:
        pass

    def on_step_start(self, **kwargs) -> None:
        pass

    def on_step_end(self, **kwargs) -> None:
        pass

    def on_samples_rendered(self, **kwargs) -> None:
        pass

    def transform_caption(self, caption: str) -> str:
        return caption

    def transform_pil_image(self, img):
        return img


def class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


_FAILED = re.compile(r"plugin (\S+) failed in (\w+): ")


class PluginError(Exception):
    """A plugin's hook raised (or returned something unusable).

    `plugin` is the plugin's name (its class path), `hook` the hook's name, `original` the exception.

    Built from one string (that is how PyTorch's DataLoader re-raises an exception from a worker process,
    with the worker's traceback as the message, and how an unpickled PluginError is rebuilt), `plugin`
    and `hook` are read back from the message's last "plugin X failed in H:" and `original` is None.
    """

    def __init__(self, plugin: str, hook: Optional[str] = None, original: Optional[BaseException] = None):
        if hook is None and original is None:
            message = str(plugin)
            found = _FAILED.findall(message)
            plugin, hook = found[-1] if found else ("unknown", "unknown")
        else:
            message = f"plugin {plugin} failed in {hook}: {type(original).__name__}: {original}"
        super().__init__(message)
        self.plugin = plugin
        self.hook = hook
        self.original = original


class PluginRunner:
    """The loaded plugins, called in the order they were listed.

    Every call is timed; one slower than SLOW_HOOK_SECONDS[hook] logs a warning. An exception from a plugin
    becomes a PluginError naming the plugin and the hook. Picklable (the data-loader workers get a copy) as
    long as the plugins are.
    """

    def __init__(self, plugins: Sequence[BasePlugin] = (), names: Optional[Sequence[str]] = None):
        self.plugins = list(plugins)
        for plugin in self.plugins:
            if not isinstance(plugin, BasePlugin):
                raise TypeError(f"{class_path(plugin)} is not a utils.plugins.BasePlugin")
        self.names = [class_path(p) for p in self.plugins] if names is None else list(names)
        if len(self.names) != len(self.plugins):
            raise ValueError(f"{len(self.plugins)} plugins but {len(self.names)} names")

    def __bool__(self) -> bool:
        return bool(self.plugins)

    def __len__(self) -> int:
        return len(self.plugins)

    def __repr__(self) -> str:
        return f"PluginRunner({self.names})"

    def _overridden(self, hook: str) -> bool:
        return any(getattr(type(p), hook) is not getattr(BasePlugin, hook) for p in self.plugins)

    @property
    def changes_images(self) -> bool:
        """Whether any plugin overrides transform_pil_image (then the latent cache cannot be used)."""
        return self._overridden("transform_pil_image")

    @property
    def changes_captions(self) -> bool:
        """Whether any plugin overrides transform_caption."""
        return self._overridden("transform_caption")

    def _run(self, n: int, hook: str, *args, **kwargs):
        plugin, name = self.plugins[n], self.names[n]
        start = time.perf_counter()
        try:
            result = getattr(plugin, hook)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever a plugin raises, the run must say which one
            raise PluginError(name, hook, e) from e
        elapsed = time.perf_counter() - start
        limit = SLOW_HOOK_SECONDS[hook]
        if elapsed > limit:
            log.warning("plugin %s: %s took %.2f seconds (more than the %g seconds expected of it)",
                        name, hook, elapsed, limit)
        return result

    def call(self, hook: str, **kwargs) -> None:
        """Call event hook `hook` (e.g. "on_step_end") of every plugin with these keyword arguments."""
        if hook not in EVENT_HOOKS:
            raise ValueError(f"unknown plugin hook {hook!r}; the hooks are {', '.join(EVENT_HOOKS)}")
        for n in range(len(self.plugins)):
            self._run(n, hook, **kwargs)

    def transform_caption(self, caption: str) -> str:
        """The caption after every plugin's transform_caption, in order."""
        for n in range(len(self.plugins)):
            caption = self._run(n, "transform_caption", caption)
            if not isinstance(caption, str):
                raise PluginError(self.names[n], "transform_caption", TypeError(
                    f"returned {type(caption).__name__}, not the caption as a str"))
        return caption

    def transform_pil_image(self, img: Image.Image) -> Image.Image:
        """The image after every plugin's transform_pil_image, in order. Each plugin gets an RGB PIL image
        and may return a PIL image (any mode; converted to RGB) or an HxWx3 uint8 numpy array, of the
        same size as it was given."""
        for n in range(len(self.plugins)):
            size = img.size
            img = _as_rgb_image(self._run(n, "transform_pil_image", img), size, self.names[n])
        return img


def _as_rgb_image(result, size: tuple[int, int], name: str) -> Image.Image:
    def fail(problem: str) -> PluginError:
        return PluginError(name, "transform_pil_image", TypeError(
            f"returned {problem}; return a PIL image or an HxWx3 uint8 numpy array of the size it was "
            f"given ({size[0]}x{size[1]})"))

    if isinstance(result, Image.Image):
        img = result if result.mode == "RGB" else result.convert("RGB")
    elif isinstance(result, np.ndarray):
        if result.dtype != np.uint8 or result.ndim != 3 or result.shape[2] != 3:
            raise fail(f"a {result.dtype} array of shape {tuple(result.shape)}")
        img = Image.fromarray(np.ascontiguousarray(result))  # uint8 HxWx3: RGB
    else:
        raise fail(type(result).__name__)
    if img.size != size:
        raise fail(f"a {img.size[0]}x{img.size[1]} image")
    return img
