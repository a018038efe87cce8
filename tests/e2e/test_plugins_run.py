"""Plugins in real runs of train.py (REFERENCE §8.2, doc/PLUGINS.md): a plugin file written only from the
reference's interface sees every hook at the documented points with the documented keyword arguments; a failing
hook stops the run with a resumable checkpoint that findlast continues; bad plugin names stop before anything is
made; EveryDream2's Accumulnator ramps grad_accum."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_MODEL, write_json

# Written from REFERENCE §8.2 alone: hook names, keyword arguments, transforms.
PLUGIN_SOURCE = textwrap.dedent('''
    import json, os
    from utils.plugins import BasePlugin

    class Recorder(BasePlugin):
        def __init__(self):
            self.out = os.environ["PLUGIN_RECORD"]

        def _write(self, hook, **kwargs):
            shown = {k: (v if isinstance(v, (int, str, list)) or v is None else type(v).__name__)
                     for k, v in kwargs.items()}
            if "batch" in kwargs:
                shown["batch_keys"] = sorted(kwargs["batch"])
            if "ed_state" in kwargs:
                shown["ed_state"] = sorted(vars(kwargs["ed_state"]))
            with open(self.out, "a") as f:
                f.write(json.dumps({"hook": hook, **shown}) + "\\n")

        def on_training_start(self, **kwargs): self._write("on_training_start", **kwargs)
        def on_epoch_start(self, **kwargs): self._write("on_epoch_start", **kwargs)
        def on_step_start(self, **kwargs): self._write("on_step_start", **kwargs)
        def on_step_end(self, **kwargs):
            self._write("on_step_end", **kwargs)
            if kwargs["global_step"] == int(os.environ.get("PLUGIN_FAIL_AT", "-1")):
                raise RuntimeError("the plugin broke on purpose")
        def on_epoch_end(self, **kwargs): self._write("on_epoch_end", **kwargs)
        def on_training_end(self, **kwargs): self._write("on_training_end", **kwargs)
        def on_samples_rendered(self, samples, **kwargs):
            self._write("on_samples_rendered", **kwargs, drawn=[[s.prompt, s.seed, s.cfg, list(s.image.size)]
                                                                for s in samples])
        def transform_caption(self, caption):
            if os.environ.get("PLUGIN_FAIL_CAPTIONS"):
                raise ValueError("no captions today")
            return caption.upper()
''')


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch) -> Path:
    """The working directory, holding the user's plugin module (modules load from there)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_plugins.py").write_text(PLUGIN_SOURCE)
    monkeypatch.chdir(work)
    monkeypatch.setenv("PLUGIN_RECORD", str(tmp_path / "record.jsonl"))
    return work


def train(tmp_path: Path, data_root: Path, *flags: str, plugins=("my_plugins.Recorder",), logdir="logs") -> int:
    import train as train_module

    config = write_json(tmp_path / "train.json", {"plugins": list(plugins)})
    optimizer = write_json(tmp_path / "optimizer.json", {"base": {"optimizer": "adamw", "lr": 1e-3,
                                                                  "lr_scheduler": "constant"}})
    return train_module.main(["--config", str(config), "--resume_ckpt", str(TINY_MODEL), "--data_root",
                              str(data_root), "--resolution", "64", "--batch_size", "2", "--max_epochs", "2",
                              "--logdir", str(tmp_path / logdir), "--sample_steps", "0", "--no_save_ckpt",
                              "--optimizer_config", str(optimizer), "--project_name", "plug", "--seed", "3", *flags])


def test_sample_events_hand_their_images_to_plugins(tmp_path, small_dataset, plugin_dir):
    prompts = write_json(tmp_path / "samples.json", {"cfgs": [3, 1], "num_inference_steps": 2, "samples": [
        {"prompt": "a red square", "seed": 5}, {"prompt": "a blue square", "seed": 6, "size": [96, 64]}]})
    assert train(tmp_path, small_dataset, "--sample_prompts", str(prompts), "--sample_steps", "4") == 0
    rendered = [c for c in records(tmp_path) if c["hook"] == "on_samples_rendered"]
    assert [(c["global_step"], c["label"]) for c in rendered] == [(0, ""), (4, ""), (8, "")]
    assert all(c["tb_writer"] == "SummaryWriter" and Path(c["log_folder"]).is_dir() for c in rendered)
    assert sorted(map(tuple, (tuple(d[:3]) + (tuple(d[3]),) for d in rendered[0]["drawn"]))) == [
        ("a blue square", 6, 1, (96, 64)), ("a blue square", 6, 3, (96, 64)),
        ("a red square", 5, 1, (64, 64)), ("a red square", 5, 3, (64, 64))]


def records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "record.jsonl").read_text().splitlines()]


def test_every_hook_fires_at_its_point_with_everydream2s_arguments(tmp_path, small_dataset, plugin_dir):
    assert train(tmp_path, small_dataset, "--write_schedule") == 0
    calls = records(tmp_path)
    hooks = [c["hook"] for c in calls]
    steps = 4  # 8 images at batch 2
    epoch = ["on_epoch_start"] + ["on_step_start", "on_step_end"] * steps + ["on_epoch_end"]
    assert hooks == ["on_training_start"] + epoch * 2 + ["on_training_end"]
    start = calls[0]
    assert set(start) == {"hook", "log_folder", "project_name"} and Path(start["log_folder"]).is_dir()
    epoch_start = calls[1]
    assert set(epoch_start) == {"hook", "epoch", "global_step", "epoch_length", "project_name", "log_folder",
                                "data_root", "arg_update_callback"}
    assert (epoch_start["epoch"], epoch_start["global_step"], epoch_start["epoch_length"]) == (0, 0, steps)
    step_ends = [c for c in calls if c["hook"] == "on_step_end"]
    assert [c["global_step"] for c in step_ends] == list(range(2 * steps))  # 0-based, as EveryDream2 passes it
    assert [c["local_step"] for c in step_ends] == list(range(steps)) * 2
    assert {"image", "tokens", "captions", "runt_size", "loss_scale"} <= set(step_ends[0]["batch_keys"])
    assert step_ends[0]["ed_state"] == ["optimizer", "scheduler", "text_encoder", "text_encoder_ema", "tokenizer",
                                        "train_batch", "unet", "unet_ema", "vae"]
    epoch_ends = [c for c in calls if c["hook"] == "on_epoch_end"]
    assert [(c["epoch"], c["global_step"]) for c in epoch_ends] == [(0, steps), (1, 2 * steps)]
    assert set(calls[-1]) == {"hook", "global_step", "log_folder", "tb_writer"} and calls[-1]["global_step"] == 8
    # transform_caption ran in the data pipeline: the schedule shows the captions as trained
    schedule = next((tmp_path / "logs").glob("plug_*/ep0_batch_schedule.txt")).read_text()
    assert "caption:A RED SQUARE" in schedule and "caption:a red square" not in schedule


def test_a_failing_hook_saves_a_resumable_checkpoint_and_findlast_finishes_the_run(tmp_path, small_dataset,
                                                                                    plugin_dir, monkeypatch):
    assert train(tmp_path, small_dataset, logdir="whole") == 0  # the run as it would have gone
    monkeypatch.setenv("PLUGIN_FAIL_AT", "5")
    assert train(tmp_path, small_dataset) == 1
    (interrupted,) = (tmp_path / "logs").glob("plug_*/ckpts/*")
    assert interrupted.name == "interrupted-gs6" and (interrupted / "training_state.pt").is_file()
    monkeypatch.delenv("PLUGIN_FAIL_AT")
    assert train(tmp_path, small_dataset, "--resume_ckpt", "findlast") == 0
    (final,) = (tmp_path / "logs").glob("plug_*/ckpts/last-plug-ep02-gs00008")
    (uninterrupted,) = (tmp_path / "whole").glob("plug_*/ckpts/last-plug-ep02-gs00008")
    for part in ("unet", "text_encoder"):
        resumed, whole = (load_file(next((f / part).glob("*.safetensors"))) for f in (final, uninterrupted))
        assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_a_failing_data_transform_stops_with_a_resumable_checkpoint(tmp_path, small_dataset, plugin_dir, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv("PLUGIN_FAIL_CAPTIONS", "1")
    assert train(tmp_path, small_dataset) == 1
    assert "plugin my_plugins.Recorder failed in transform_caption" in capsys.readouterr().out
    (interrupted,) = (tmp_path / "logs").glob("plug_*/ckpts/*")
    assert interrupted.name == "interrupted-gs0" and (interrupted / "training_state.pt").is_file()


@pytest.mark.parametrize("entry, message", [
    ("no_such_module.Plugin", "no_such_module"),
    ("my_plugins.NoSuchClass", "NoSuchClass"),
    ("my_plugins.json", "not a class"),
])
def test_a_bad_plugin_stops_before_anything_is_made(tmp_path, small_dataset, plugin_dir, capsys, entry, message):
    assert train(tmp_path, small_dataset, plugins=[entry]) == 2
    assert not (tmp_path / "logs").exists()
    error = capsys.readouterr().out  # train.py logs to the console through tqdm
    assert message in error and entry in error


def test_everydream2s_accumulnator_ramps_grad_accum_per_epoch(tmp_path, small_dataset, plugin_dir):
    (plugin_dir / "plugins").mkdir()
    write_json(plugin_dir / "plugins" / "accumulnator.json",
               {"begin_epoch": 1, "end_epoch": 3, "begin_grad_accum": 1, "end_grad_accum": 4, "curve": "linear"})
    assert train(tmp_path, small_dataset, "--max_epochs", "3", "--save_optimizer",
                 plugins=["plugins.accumulnator.Accumulnator"]) == 0
    # epochs of 4 steps at grad_accum 1, 1, 4: 4 + 4 + 1 optimizer updates
    (final,) = (tmp_path / "logs").glob("plug_*/ckpts/last-plug-ep03-gs00012")
    state = torch.load(final / "optimizer_unet.pt", weights_only=True)
    assert state["state"][0]["step"].item() == 9
