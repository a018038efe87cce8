"""Tests for utils/plugins: loading plugin classes by name, the runner, Accumulnator, the shipped examples,
and the data loader's caption and image transforms.

Plugin modules are real files written into tmp_path (the current directory while a test runs); the
data tests decode real images with a real (tiny, in-memory) CLIP tokenizer. Nothing of ours is mocked.
"""
from __future__ import annotations

import json
import logging
import math
import pickle
import re
import string
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from data import assign_buckets, build_epoch_batches, make_epoch_loader, scan, write_schedule
from data.images import load_training_image, to_tensor
from data.loader import sample_rng
from utils.options.config import ConfigError
from utils.plugins import SLOW_HOOK_SECONDS, BasePlugin, PluginError, PluginRunner, load_plugins
from utils.plugins.accumulnator import SHIPPED_CONFIG, Accumulnator
from utils.plugins.examples import ExampleLoggingPlugin, ReplaceWordsAndGrade

from tests.conftest import TINY_MODEL

# The keyword arguments the training loop passes (doc/PLUGINS.md, REFERENCE §8.2).
HOOK_KWARGS = {
    "on_training_start": ["log_folder", "project_name"],
    "on_epoch_start": ["epoch", "global_step", "epoch_length", "project_name", "log_folder", "data_root",
                       "arg_update_callback"],
    "on_step_start": ["epoch", "local_step", "global_step", "project_name", "log_folder", "batch", "ed_state"],
    "on_step_end": ["epoch", "global_step", "local_step", "project_name", "log_folder", "data_root", "batch",
                    "ed_state"],
    "on_epoch_end": ["epoch", "global_step", "project_name", "log_folder", "data_root", "arg_update_callback"],
    "on_training_end": ["global_step", "log_folder", "tb_writer"],
}


# ---------------------------------------------------------------- helpers

@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """tmp_path as the current directory, with sys.path restored afterwards (conftest drops the modules)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path


def write_module(folder, relative: str, source: str):
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def config_error(names, where="train.json") -> str:
    with pytest.raises(ConfigError) as info:
        load_plugins(names, where)
    return str(info.value)


class Recorder(BasePlugin):
    """Appends (tag, hook) to a shared list for every event hook and transform."""

    def __init__(self, tag, calls):
        self.tag, self.calls = tag, calls

    def on_epoch_start(self, **kwargs):
        self.calls.append((self.tag, "on_epoch_start", kwargs))

    def on_step_end(self, **kwargs):
        self.calls.append((self.tag, "on_step_end", kwargs))

    def transform_caption(self, caption):
        return f"{caption} {self.tag}"


class Raises(BasePlugin):
    def on_step_end(self, **kwargs):
        raise ValueError("boom")

    def transform_caption(self, caption):
        raise KeyError("no such tag")


class Sleeps(BasePlugin):
    seconds = 0.12

    def on_step_end(self, **kwargs):
        time.sleep(self.seconds)

    def transform_caption(self, caption):
        time.sleep(self.seconds)
        return caption


class EventsOnly(BasePlugin):
    def on_epoch_end(self, **kwargs):
        pass


class Returns(BasePlugin):
    """transform_pil_image returns whatever `make(img)` gives."""

    def __init__(self, make):
        self.make = make

    def transform_pil_image(self, img):
        return self.make(img)


class Black(BasePlugin):
    def transform_pil_image(self, img):
        return Image.new("RGB", img.size, (0, 0, 0))


class BlackArray(BasePlugin):
    def transform_pil_image(self, img):
        return np.zeros((img.size[1], img.size[0], 3), dtype=np.uint8)


class Identity(BasePlugin):
    """Overrides both transforms and changes nothing."""

    def transform_caption(self, caption):
        return caption

    def transform_pil_image(self, img):
        return img


class SeesImages(BasePlugin):
    """Records every image it is given (in-process loaders only)."""

    def __init__(self):
        self.seen = []

    def transform_pil_image(self, img):
        self.seen.append(img.copy())
        return img


class Rename(BasePlugin):
    """'photo' -> 'zebra', counting calls."""

    def __init__(self):
        self.calls = 0

    def transform_caption(self, caption):
        self.calls += 1
        return caption.replace("photo", "zebra")


class BrokenImages(BasePlugin):
    def transform_pil_image(self, img):
        raise RuntimeError("cannot grade this")


# ---------------------------------------------------------------- BasePlugin

def test_base_plugin_hooks_do_nothing():
    plugin, img = BasePlugin(), Image.new("RGB", (4, 4))
    for hook, names in HOOK_KWARGS.items():
        assert getattr(plugin, hook)(**{n: 1 for n in names}) is None
    assert plugin.transform_caption("a cat") == "a cat"
    assert plugin.transform_pil_image(img) is img


# ---------------------------------------------------------------- load_plugins: every bad entry

def test_no_plugins():
    assert load_plugins(None, "train.json") == []
    assert load_plugins([], "train.json") == []
    assert "must be a list" in config_error("my_plugins.Counter")
    assert "strings" in config_error([3])


def test_name_without_a_dot(cwd):
    message = config_error(["Counter"], where="command line")
    assert message.startswith("command line: plugins entry 'Counter' is not of the form module.Class")


def test_missing_module_names_the_directory(cwd):
    message = config_error(["no_such_plugins.Counter"])
    assert "train.json: plugins entry 'no_such_plugins.Counter': no module 'no_such_plugins'" in message
    assert str(cwd) in message and "no_such_plugins.py" in message
    # a missing package is the module itself too
    assert "no module 'pkg_missing.sub'" in config_error(["pkg_missing.sub.Counter"])


def test_import_error_inside_the_module_is_not_a_missing_module(cwd):
    write_module(cwd, "needs_dep.py", "import dependency_that_is_not_installed\n")
    message = config_error(["needs_dep.Counter"])
    assert "importing module needs_dep" in message and str(cwd / "needs_dep.py") in message
    assert "ModuleNotFoundError: No module named 'dependency_that_is_not_installed'" in message
    assert "no module 'needs_dep'" not in message

    write_module(cwd, "raises_on_import.py", "raise RuntimeError('configure me first')\n")
    assert "importing module raises_on_import" in (m := config_error(["raises_on_import.X"]))
    assert "RuntimeError: configure me first" in m

    write_module(cwd, "bad_syntax.py", "def broken(:\n")
    assert "SyntaxError" in config_error(["bad_syntax.X"])


def test_everydream2_import_line_gets_the_fix(cwd):
    write_module(cwd, "ed2_style.py", """\
        from plugins.plugins import BasePlugin

        class Counter(BasePlugin):
            pass
        """)
    message = config_error(["ed2_style.Counter"])
    assert "No module named 'plugins'" in message
    assert "change `from plugins.plugins import BasePlugin` to `from utils.plugins import BasePlugin`" in message


def test_missing_class_suggests_close_names(cwd):
    write_module(cwd, "counting.py", """\
        from utils.plugins import BasePlugin

        class StepCounter(BasePlugin):
            pass

        class Helper:
            pass
        """)
    assert "module counting" in (m := config_error(["counting.StepCountr"]))
    assert "has no 'StepCountr'; did you mean StepCounter?" in m
    assert "its plugin classes are StepCounter" in config_error(["counting.Zebra"])


def test_not_a_class_or_not_a_plugin(cwd):
    write_module(cwd, "odd.py", """\
        def make_plugin():
            pass

        class NotAPlugin:
            pass
        """)
    message = config_error(["odd.make_plugin"])
    assert "make_plugin" in message and "is a function, not a class" in message
    message = config_error(["odd.NotAPlugin"])
    assert "does not subclass utils.plugins.BasePlugin" in message
    assert "from utils.plugins import BasePlugin" in message


def test_constructor_failure(cwd):
    write_module(cwd, "fragile.py", """\
        from utils.plugins import BasePlugin

        class NeedsArgs(BasePlugin):
            def __init__(self, path):
                self.path = path

        class Fails(BasePlugin):
            def __init__(self):
                raise OSError("config.yaml not found")
        """)
    with pytest.raises(ConfigError) as info:
        load_plugins(["fragile.Fails"], "train.json")
    assert "plugins entry 'fragile.Fails': creating Fails()" in str(info.value)
    assert "OSError: config.yaml not found" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert "built with no arguments" in config_error(["fragile.NeedsArgs"])


def test_plugin_written_from_the_reference_interface_loads_and_runs(cwd):
    # Only what REFERENCE §8.2 says: a package.module.ClassName, subclassing BasePlugin, built with no
    # arguments, hooks taking keyword arguments.
    write_module(cwd, "my_pkg/__init__.py", "")
    write_module(cwd, "my_pkg/counting.py", """\
        from utils.plugins import BasePlugin

        class Counter(BasePlugin):
            def __init__(self):
                self.seen = []

            def on_training_start(self, **kwargs):
                self.seen.append(("on_training_start", sorted(kwargs)))

            def on_epoch_start(self, **kwargs):
                self.seen.append(("on_epoch_start", sorted(kwargs)))
                kwargs["arg_update_callback"]("grad_accum", 2)

            def on_step_start(self, **kwargs):
                self.seen.append(("on_step_start", sorted(kwargs)))

            def on_step_end(self, **kwargs):
                self.seen.append(("on_step_end", sorted(kwargs)))

            def on_epoch_end(self, **kwargs):
                self.seen.append(("on_epoch_end", sorted(kwargs)))

            def on_training_end(self, **kwargs):
                self.seen.append(("on_training_end", sorted(kwargs)))

            def transform_caption(self, caption: str) -> str:
                return caption.upper()
        """)
    if str(cwd) in sys.path:
        sys.path.remove(str(cwd))
    [plugin] = load_plugins(["my_pkg.counting.Counter"], "train.json")
    assert sys.path[0] == str(cwd)
    assert type(plugin).__module__ == "my_pkg.counting" and isinstance(plugin, BasePlugin)
    updates = []
    runner = PluginRunner([plugin])
    for hook, names in HOOK_KWARGS.items():
        kwargs = {n: 0 for n in names}
        if "arg_update_callback" in kwargs:
            kwargs["arg_update_callback"] = lambda name, value: updates.append((name, value))
        runner.call(hook, **kwargs)
    assert plugin.seen == [(hook, sorted(names)) for hook, names in HOOK_KWARGS.items()]
    assert updates == [("grad_accum", 2)]
    assert runner.transform_caption("a cat") == "A CAT"
    assert runner.changes_captions and not runner.changes_images


def test_everydream2_names_of_shipped_plugins_resolve_to_ours(cwd, caplog):
    with caplog.at_level(logging.INFO, logger="utils.plugins"):
        accum, logger = load_plugins(["plugins.accumulnator.Accumulnator",
                                      "plugins.example_plugin.ExampleLoggingPlugin"], "train.json")
    assert type(accum) is Accumulnator and type(logger) is ExampleLoggingPlugin
    assert "no module plugins.accumulnator" in caplog.text
    assert "using the trainer's own utils.plugins.accumulnator.Accumulnator" in caplog.text
    # an EveryDream2 plugin that is not shipped says so
    assert "EveryDream2 plugin this trainer does not ship" in config_error(
        ["plugins.interruptible.InterruptiblePlugin"])


def test_a_plugins_module_in_the_current_directory_wins(cwd):
    write_module(cwd, "plugins/__init__.py", "")
    write_module(cwd, "plugins/accumulnator.py", """\
        from utils.plugins import BasePlugin

        class Accumulnator(BasePlugin):
            mine = True
        """)
    [plugin] = load_plugins(["plugins.accumulnator.Accumulnator"], "train.json")
    assert type(plugin).mine and type(plugin) is not Accumulnator


def test_an_everydream2_copy_in_the_current_directory_is_explained(cwd):
    write_module(cwd, "plugins/__init__.py", "")
    write_module(cwd, "plugins/plugins.py", "class BasePlugin:\n    pass\n")
    write_module(cwd, "plugins/accumulnator.py", """\
        from plugins.plugins import BasePlugin

        class Accumulnator(BasePlugin):
            pass
        """)
    message = config_error(["plugins.accumulnator.Accumulnator"])
    assert "does not subclass utils.plugins.BasePlugin (it subclasses another BasePlugin" in message
    assert "from utils.plugins import BasePlugin" in message
    assert f"or remove {cwd / 'plugins' / 'accumulnator.py'} to use the trainer's own Accumulnator" in message


# ---------------------------------------------------------------- PluginRunner

def test_runner_calls_plugins_in_order_and_chains_transforms():
    calls = []
    runner = PluginRunner([Recorder("a", calls), Recorder("b", calls)])
    runner.call("on_epoch_start", epoch=3)
    runner.call("on_step_end", global_step=7)
    assert calls == [("a", "on_epoch_start", {"epoch": 3}), ("b", "on_epoch_start", {"epoch": 3}),
                     ("a", "on_step_end", {"global_step": 7}), ("b", "on_step_end", {"global_step": 7})]
    assert runner.transform_caption("cap") == "cap a b"
    with pytest.raises(ValueError, match="unknown plugin hook"):
        runner.call("on_step_ends")


def test_runner_flags_and_truth():
    assert not PluginRunner([]) and len(PluginRunner([])) == 0
    events = PluginRunner([EventsOnly()])
    assert events and not events.changes_images and not events.changes_captions
    assert PluginRunner([EventsOnly(), Black()]).changes_images
    assert not PluginRunner([Black()]).changes_captions
    assert PluginRunner([Rename()]).changes_captions and not PluginRunner([Rename()]).changes_images
    with pytest.raises(TypeError, match="not a utils.plugins.BasePlugin"):
        PluginRunner([object()])


def test_runner_is_picklable():
    runner = PluginRunner([ReplaceWordsAndGrade(), Rename()], names=["examples.Grade", "tests.Rename"])
    copy = pickle.loads(pickle.dumps(runner))
    assert copy.names == ["examples.Grade", "tests.Rename"]
    assert copy.transform_caption("a pic of a photo") == runner.transform_caption("a pic of a photo") \
        == "a zebra of a zebra"
    img = Image.new("RGB", (8, 8), (90, 160, 30))
    assert np.array_equal(np.asarray(copy.transform_pil_image(img)), np.asarray(runner.transform_pil_image(img)))


def test_slow_hooks_warn_with_plugin_hook_and_seconds(monkeypatch, caplog):
    monkeypatch.setitem(SLOW_HOOK_SECONDS, "on_step_end", 0.1)
    monkeypatch.setitem(SLOW_HOOK_SECONDS, "transform_caption", 0.1)
    runner = PluginRunner([EventsOnly(), Sleeps()])
    with caplog.at_level(logging.WARNING, logger="utils.plugins"):
        runner.call("on_step_end", global_step=0)
        runner.transform_caption("x")
        runner.call("on_epoch_end", epoch=0)    # fast: no warning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    for warning, hook in zip(warnings, ("on_step_end", "transform_caption")):
        m = re.fullmatch(r"plugin (\S+): (\w+) took (\d+\.\d+) seconds \(more than the 0\.1 seconds expected of it\)",
                         warning)
        assert m, warning
        assert m[1] == "tests.test_plugins.Sleeps" and m[2] == hook and float(m[3]) >= 0.11
    caplog.clear()
    monkeypatch.setitem(SLOW_HOOK_SECONDS, "on_step_end", 0.5)    # the shipped threshold: no warning
    with caplog.at_level(logging.WARNING, logger="utils.plugins"):
        runner.call("on_step_end", global_step=1)
    assert not caplog.records


def test_shipped_thresholds():
    assert SLOW_HOOK_SECONDS == {"on_training_start": 20, "on_training_end": 20, "on_epoch_start": 5,
                                 "on_epoch_end": 5, "on_step_start": 0.5, "on_step_end": 0.5,
                                 "on_samples_rendered": 20,
                                 "transform_caption": 0.5, "transform_pil_image": 0.5}


def test_a_raising_hook_is_a_plugin_error_naming_plugin_and_hook():
    calls = []
    runner = PluginRunner([Raises(), Recorder("after", calls)])
    with pytest.raises(PluginError) as info:
        runner.call("on_step_end", global_step=4)
    e = info.value
    assert (e.plugin, e.hook) == ("tests.test_plugins.Raises", "on_step_end")
    assert isinstance(e.original, ValueError) and e.__cause__ is e.original
    assert str(e) == "plugin tests.test_plugins.Raises failed in on_step_end: ValueError: boom"
    assert calls == []    # later plugins are not called
    with pytest.raises(PluginError) as info:
        PluginRunner([Raises()], names=["my_plugins.Raises"]).transform_caption("x")
    assert str(info.value) == "plugin my_plugins.Raises failed in transform_caption: KeyError: 'no such tag'"


def test_plugin_error_survives_being_rebuilt_from_its_message():
    e = PluginError("my_plugins.Grade", "transform_pil_image", RuntimeError("bad"))
    copy = pickle.loads(pickle.dumps(e))
    assert (copy.plugin, copy.hook, str(copy)) == (e.plugin, e.hook, str(e))
    # how the DataLoader re-raises a worker's exception: the type, built from the formatted traceback
    relayed = PluginError(f"Caught PluginError in DataLoader worker process 0.\nOriginal Traceback:\n"
                          f"  ...\nutils.plugins.base.PluginError: {e}\n")
    assert (relayed.plugin, relayed.hook, relayed.original) == ("my_plugins.Grade", "transform_pil_image", None)


def test_image_transform_results_are_checked():
    img = Image.new("RGB", (6, 4), (10, 20, 30))
    grey = PluginRunner([Returns(lambda i: i.convert("L"))]).transform_pil_image(img)
    assert grey.mode == "RGB" and grey.size == (6, 4)
    array = PluginRunner([Returns(lambda i: np.full((4, 6, 3), 7, np.uint8))]).transform_pil_image(img)
    assert array.mode == "RGB" and np.asarray(array).tolist() == np.full((4, 6, 3), 7).tolist()
    for bad, said in ((lambda i: np.zeros((4, 6, 3)), "a float64 array of shape (4, 6, 3)"),
                      (lambda i: np.zeros((6, 4, 3), np.uint8), "a 4x6 image"),
                      (lambda i: i.resize((3, 2)), "a 3x2 image"),
                      (lambda i: None, "returned NoneType"),
                      (lambda i: torch.zeros(3, 4, 6), "returned Tensor")):
        with pytest.raises(PluginError) as info:
            PluginRunner([Returns(bad)], names=["p.Bad"]).transform_pil_image(img)
        assert info.value.hook == "transform_pil_image" and info.value.plugin == "p.Bad"
        assert said in str(info.value) and "HxWx3 uint8 numpy array of the size it was given (6x4)" in str(info.value)
    class NoCaption(BasePlugin):
        def transform_caption(self, caption):
            return None

    with pytest.raises(PluginError, match="returned NoneType, not the caption as a str"):
        PluginRunner([NoCaption()]).transform_caption("x")


# ---------------------------------------------------------------- Accumulnator

def linear_table(begin_epoch, end_epoch, begin, end):
    n = end_epoch - begin_epoch
    values = [begin + (end - begin) * i / (n - 1) for i in range(n)] if n > 1 else [begin] * n
    return {**{e: begin for e in range(begin_epoch)}, **{begin_epoch + i: round(v) for i, v in enumerate(values)}}


def log_table(begin_epoch, end_epoch, begin, end):
    n = end_epoch - begin_epoch
    lo, hi = math.log2(begin), math.log2(end)
    values = [2 ** (lo + (hi - lo) * i / (n - 1)) for i in range(n)] if n > 1 else [begin] * n
    return {**{e: begin for e in range(begin_epoch)}, **{begin_epoch + i: round(v) for i, v in enumerate(values)}}


def write_accum_config(path, **values):
    config = {"documentation": {"curve": "ignored"}, "begin_epoch": 3, "end_epoch": 10, "begin_grad_accum": 1,
              "end_grad_accum": 100, "curve": "linear", **values}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return path


def test_shipped_accumulnator_config_is_everydream2s(cwd):
    config = json.loads(SHIPPED_CONFIG.read_text())
    assert {k: config[k] for k in ("begin_epoch", "end_epoch", "begin_grad_accum", "end_grad_accum", "curve")} == \
        {"begin_epoch": 3, "end_epoch": 10, "begin_grad_accum": 1, "end_grad_accum": 100, "curve": "linear"}
    plugin = Accumulnator()
    assert plugin.config_path == SHIPPED_CONFIG
    # linspace(1, 100, 7) = 1, 17.5, 34, 50.5, 67, 83.5, 100, rounded half to even as Python's round()
    assert plugin.per_epoch_grad_accum == {0: 1, 1: 1, 2: 1, 3: 1, 4: 18, 5: 34, 6: 50, 7: 67, 8: 84, 9: 100}


@pytest.mark.parametrize("begin_epoch,end_epoch,begin,end", [(3, 10, 1, 100), (0, 5, 2, 9), (2, 3, 4, 4),
                                                             (1, 13, 1, 64), (4, 4, 3, 8), (0, 20, 8, 1)])
def test_accumulnator_table_follows_the_formula(tmp_path, begin_epoch, end_epoch, begin, end):
    keys = dict(begin_epoch=begin_epoch, end_epoch=end_epoch, begin_grad_accum=begin, end_grad_accum=end)
    linear = Accumulnator(write_accum_config(tmp_path / "linear.json", **keys, curve="linear"))
    assert linear.per_epoch_grad_accum == linear_table(begin_epoch, end_epoch, begin, end)
    log = Accumulnator(write_accum_config(tmp_path / "log.json", **keys, curve="log"))
    assert log.per_epoch_grad_accum == log_table(begin_epoch, end_epoch, begin, end)
    assert len(linear.per_epoch_grad_accum) == max(begin_epoch, end_epoch)


def test_accumulnator_log_curve_differs_from_linear(tmp_path):
    table = Accumulnator(write_accum_config(tmp_path / "a.json", begin_epoch=0, end_epoch=7, end_grad_accum=64,
                                            curve="log")).per_epoch_grad_accum
    assert table == {0: 1, 1: 2, 2: 4, 3: 8, 4: 16, 5: 32, 6: 64}


def test_accumulnator_reads_plugins_json_in_the_current_directory(cwd):
    write_accum_config(cwd / "plugins" / "accumulnator.json", begin_epoch=0, end_epoch=3, begin_grad_accum=2,
                       end_grad_accum=6)
    [plugin] = load_plugins(["plugins.accumulnator.Accumulnator"], "train.json")
    assert plugin.config_path == cwd / "plugins" / "accumulnator.json"
    assert plugin.per_epoch_grad_accum == {0: 2, 1: 4, 2: 6}


@pytest.mark.parametrize("values,said", [
    ({"end_epoch": None}, "key 'end_epoch' is missing"),
    ({"begin_grad_accum": 1.5}, "key 'begin_grad_accum' must be an integer; got 1.5"),
    ({"begin_epoch": "3"}, "key 'begin_epoch' must be an integer; got \"3\""),
    ({"end_grad_accum": True}, "key 'end_grad_accum' must be an integer; got true"),
    ({"begin_epoch": 5, "end_epoch": 4}, "key 'end_epoch' (4) must not be before 'begin_epoch' (5)"),
    ({"begin_grad_accum": 0}, "key 'begin_grad_accum' must be at least 1; got 0"),
    ({"begin_epoch": -1}, "key 'begin_epoch' must be 0 or more"),
    ({"curve": "cosine"}, "key 'curve' must be one of linear, log; got \"cosine\""),
    ({"curve": None}, "key 'curve' is missing"),
])
def test_accumulnator_config_errors_name_file_and_key(cwd, values, said):
    path = write_accum_config(cwd / "plugins" / "accumulnator.json", **values)
    message = config_error(["plugins.accumulnator.Accumulnator"])
    assert message.startswith("train.json: plugins entry 'plugins.accumulnator.Accumulnator': ")
    assert f"{path}: " in message and said in message


def test_accumulnator_config_that_is_not_json(tmp_path):
    (tmp_path / "a.json").write_text("{begin_epoch: 3}")
    with pytest.raises(ConfigError, match=r"a\.json: not valid JSON"):
        Accumulnator(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("[3, 10]")
    with pytest.raises(ConfigError, match=r"b\.json: must be a JSON object"):
        Accumulnator(tmp_path / "b.json")


def test_accumulnator_sets_grad_accum_at_epoch_start_and_end(tmp_path, caplog):
    plugin = Accumulnator(write_accum_config(tmp_path / "a.json", begin_epoch=2, end_epoch=5, begin_grad_accum=1,
                                             end_grad_accum=5))
    assert plugin.per_epoch_grad_accum == {0: 1, 1: 1, 2: 1, 3: 3, 4: 5}
    updates = []

    def callback(name, value):
        updates.append((name, value))

    with caplog.at_level(logging.INFO, logger="utils.plugins"):
        runner = PluginRunner([plugin])
        for epoch in range(7):
            runner.call("on_epoch_start", epoch=epoch, arg_update_callback=callback, global_step=0)
            runner.call("on_epoch_end", epoch=epoch, arg_update_callback=callback, global_step=0)
    # epoch 0's start sets 1; the end of epoch 2 sets epoch 3's 3 (EveryDream2's hook) and epoch 3's start
    # finds it already set; past the table the last value stays
    assert updates == [("grad_accum", 1), ("grad_accum", 3), ("grad_accum", 5)]
    assert "Accumulnator: grad_accum 3 for epoch 3" in caplog.text

    # a resumed run (a new process) starting at epoch 3, or past the table, gets that epoch's value
    for epoch, expected in ((3, 3), (9, 5)):
        updates.clear()
        fresh = Accumulnator(tmp_path / "a.json")
        fresh.on_epoch_start(epoch=epoch, arg_update_callback=callback)
        assert updates == [("grad_accum", expected)]
    # EveryDream2's own call pattern: on_epoch_end only, with the next epoch's value
    updates.clear()
    ed2 = Accumulnator(tmp_path / "a.json")
    for epoch in range(6):
        ed2.on_epoch_end(epoch=epoch, arg_update_callback=callback)
    assert updates == [("grad_accum", 1), ("grad_accum", 3), ("grad_accum", 5)]


# ---------------------------------------------------------------- examples

def test_example_logging_plugin_logs_each_hook_and_its_keys(caplog):
    runner = PluginRunner([ExampleLoggingPlugin()])
    with caplog.at_level(logging.INFO, logger="utils.plugins"):
        for hook, names in HOOK_KWARGS.items():
            runner.call(hook, **{n: object() for n in names})
    for hook, names in HOOK_KWARGS.items():
        assert f"ExampleLoggingPlugin: {hook}({', '.join(names)})" in caplog.text
    assert not runner.changes_images and not runner.changes_captions


def test_replace_words_and_grade():
    plugin = ReplaceWordsAndGrade()
    assert plugin.transform_caption("a Pic of a bw dog, img2, picture") == "a photo of a black and white dog, img2, picture"
    img = Image.fromarray(np.array([[[0, 64, 255], [128, 128, 128]]], dtype=np.uint8))
    out = np.asarray(plugin.transform_pil_image(img)).astype(int)
    # grey stays grey under saturation; gamma 0.9 brightens it: 255 * (128/255) ** 0.9
    assert out[0, 1].tolist() == [round(255 * (128 / 255) ** 0.9)] * 3
    assert out[0, 0, 2] == 255 and out[0, 0, 0] == 0   # saturation keeps the extremes apart

    class Mine(ReplaceWordsAndGrade):
        WORDS = {"dog": ""}
        GAMMA = 1.0
        SATURATION = 0.0

    assert Mine().transform_caption("a dog , running") == "a , running"
    grey = np.asarray(Mine().transform_pil_image(Image.new("RGB", (2, 2), (200, 20, 20))))
    assert (grey == grey[..., :1]).all()    # saturation 0: every channel the same


# ---------------------------------------------------------------- the data loader

@pytest.fixture(scope="module")
def tokenizer():
    # A real CLIP tokenizer with a character-level vocabulary: no download needed.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ",.!? '":
        for token in (c, c + "</w>"):
            vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


@pytest.fixture
def records(tmp_path):
    """Six random-pixel images (larger than their bucket, so crops and flips matter), tagged captions."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    for n in range(6):
        size = (150, 140) if n < 4 else (200, 140)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"img{n}.png")
        (root / f"img{n}.txt").write_text(f"photo {n}, red, round, small")
    return assign_buckets(scan(str(root)).records, 128)


def batches(records, tokenizer, **kw):
    args = dict(cond_dropout=0.0, seed=5, epoch=1, num_workers=0, flip_p=0.5, shuffle_tags=True)
    plan = build_epoch_batches(records, batch_size=2, seed=5, epoch=1)
    return plan, list(make_epoch_loader(plan, records, tokenizer, **{**args, **kw}))


def test_without_plugins_nothing_changes(records, tokenizer):
    plan, plain = batches(records, tokenizer)
    for plugins in (PluginRunner([]), PluginRunner([EventsOnly()]), PluginRunner([Identity()])):
        _, other = batches(records, tokenizer, plugins=plugins)
        for a, b in zip(plain, other, strict=True):
            assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
            assert a["captions"] == b["captions"]
    # and plugins=None is the image pipeline of data/images.py, slot by slot
    for step, batch in enumerate(plain):
        for slot, index in enumerate(plan[step].indices):
            loaded = load_training_image(records[index].path, plan[step].bucket, sample_rng(5, 1, step, slot, "crop"))
            pixels = batch["pixel_values"][slot]
            assert torch.equal(pixels, loaded) or torch.equal(pixels, torch.flip(loaded, [-1]))


def test_caption_transform_runs_after_assembly_before_dropout_and_tokenizing(records, tokenizer, tmp_path):
    _, plain = batches(records, tokenizer)
    rename = Rename()
    plan, renamed = batches(records, tokenizer, plugins=PluginRunner([rename]))
    assert rename.calls == 2 * len(plan)
    for a, b in zip(plain, renamed, strict=True):
        assert b["captions"] == [c.replace("photo", "zebra") for c in a["captions"]]   # tags shuffled the same
        assert all(c.startswith("zebra ") for c in b["captions"])
        decoded = tokenizer.batch_decode(b["input_ids"], skip_special_tokens=True)
        assert [d.replace(" ", "") for d in decoded] == [c.replace(" ", "") for c in b["captions"]]
        assert torch.equal(a["pixel_values"], b["pixel_values"])

    # dropout replaces the transformed caption; the plugin still sees every caption (as in EveryDream2)
    rename = Rename()
    _, dropped = batches(records, tokenizer, plugins=PluginRunner([rename]), cond_dropout=1.0)
    assert {c for b in dropped for c in b["captions"]} == {" "} and rename.calls == 2 * len(plan)
    ids = dropped[0]["input_ids"][0]
    assert ids[0] == tokenizer.bos_token_id and (ids[1:] == tokenizer.eos_token_id).all()

    # the batch schedule shows the transformed caption
    loader = make_epoch_loader(plan, records, tokenizer, 0.0, 5, 1, flip_p=0.5, shuffle_tags=True,
                               plugins=PluginRunner([Rename()]))
    write_schedule(tmp_path / "schedule.txt", loader.dataset)
    scheduled = [line.split(", caption:", 1)[1] for line in (tmp_path / "schedule.txt").read_text().splitlines()]
    assert scheduled == [c for b in renamed for c in b["captions"]]


def test_image_transform_runs_on_the_cropped_flipped_image_before_normalising(records, tokenizer):
    _, plain = batches(records, tokenizer)
    for plugin in (Black(), BlackArray()):
        _, black = batches(records, tokenizer, plugins=PluginRunner([plugin]))
        for a, b in zip(plain, black, strict=True):
            assert b["pixel_values"].shape == a["pixel_values"].shape
            assert (b["pixel_values"] == -1).all()
            assert b["captions"] == a["captions"]
    seer = SeesImages()
    _, seen = batches(records, tokenizer, plugins=PluginRunner([seer]))
    got = [img for img in seer.seen]
    trained = [pixels for batch in seen for pixels in batch["pixel_values"]]
    assert len(got) == len(trained) and all(img.mode == "RGB" for img in got)
    for img, pixels, expected in zip(got, trained, [p for b in plain for p in b["pixel_values"]]):
        assert img.size == (pixels.shape[2], pixels.shape[1])    # bucket-sized, after crop/resize
        assert torch.equal(to_tensor(img), pixels) and torch.equal(pixels, expected)   # flipped already
    graded = PluginRunner([ReplaceWordsAndGrade()])
    _, grade = batches(records, tokenizer, plugins=graded)
    for a, b in zip(plain, grade):
        assert not torch.equal(a["pixel_values"], b["pixel_values"])
        assert b["pixel_values"].min() >= -1 and b["pixel_values"].max() <= 1


def test_plugin_failure_in_a_worker_reaches_the_caller_as_a_plugin_error(records, tokenizer):
    """A DataLoader worker's exception is re-raised in the training process as `type(message)`, through torch's
    ExceptionWrapper; a PluginError must survive that with its plugin and hook. (The wrapper is used directly:
    a real worker that raises can leave the test waiting on its shutdown.)"""
    from torch._utils import ExceptionWrapper

    plan = build_epoch_batches(records, batch_size=2, seed=5, epoch=1)
    loader = make_epoch_loader(plan, records, tokenizer, 0.0, 5, 1,
                               plugins=PluginRunner([BrokenImages()], names=["my_plugins.Grade"]))
    try:
        list(loader)
    except PluginError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(PluginError) as info:
        wrapped.reraise()
    assert (info.value.plugin, info.value.hook) == ("my_plugins.Grade", "transform_pil_image")
    assert "RuntimeError: cannot grade this" in str(info.value)


def test_image_plugins_and_the_latent_cache_do_not_mix(records, tokenizer, tmp_path):
    from diffusers import AutoencoderKL

    from data.latent_cache import LatentCache

    cache = LatentCache(tmp_path / "cache", AutoencoderKL.from_pretrained(TINY_MODEL, subfolder="vae"))
    plan = build_epoch_batches(records, batch_size=2, seed=5, epoch=1)
    with pytest.raises(ValueError, match="a plugin transforms images"):
        make_epoch_loader(plan, records, tokenizer, 0.0, 5, 1, latent_cache=cache, plugins=PluginRunner([Black()]))
    # a caption-only plugin works with the cache
    batch = next(iter(make_epoch_loader(plan, records, tokenizer, 0.0, 5, 1, latent_cache=cache,
                                        plugins=PluginRunner([Rename()]))))
    assert all(c.startswith("zebra") for c in batch["captions"])
