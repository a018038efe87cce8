"""Plugins: user classes whose hooks the training loop calls (doc/PLUGINS.md).

    from utils.plugins import BasePlugin          # what a plugin subclasses (EveryDream2's interface)
    plugins = load_plugins(args.plugins, "train.json")
    runner = PluginRunner(plugins)
    runner.call("on_epoch_start", epoch=0, ...)   # event hooks, timed; a raise becomes PluginError
    runner.transform_caption(text); runner.transform_pil_image(img)   # in the data workers

Shipped plugins: utils.plugins.accumulnator.Accumulnator (grad_accum ramp) and utils.plugins.examples.
"""
from utils.plugins.base import SLOW_HOOK_SECONDS, BasePlugin, PluginError, PluginRunner
from utils.plugins.loading import load_plugins

__all__ = ["SLOW_HOOK_SECONDS", "BasePlugin", "PluginError", "PluginRunner", "load_plugins"]
