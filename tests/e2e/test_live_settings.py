"""load_settings_every_epoch: the --config file re-read at each epoch start, live keys applied, the rest refused."""
from __future__ import annotations

import json
import threading
import time

from tests.conftest import REPO, TINY_MODEL, write_json
from utils.options import config

LIVE = {"save_every_n_epochs", "save_ckpts_from_n_epochs", "save_full_precision", "save_optimizer",
        "zero_frequency_noise_ratio", "min_snr_gamma", "clip_skip"}


def _start(tmp_path, small_dataset, **extra):
    cfg = write_json(tmp_path / "train.json", {"resume_ckpt": str(TINY_MODEL), "data_root": str(small_dataset),
                                               "load_settings_every_epoch": True, "save_every_n_epochs": 10,
                                               "min_snr_gamma": None, "batch_size": 2, **extra})
    return cfg, config.load(["--config", str(cfg), "--clip_skip", "2"])


def test_the_live_keys_are_exactly_the_documented_ones():
    assert set(config.LIVE_KEYS) == LIVE


def test_live_keys_apply_other_keys_are_refused_and_the_command_line_still_wins(tmp_path, small_dataset):
    cfg, args = _start(tmp_path, small_dataset)
    assert config.reload_live_settings(args, max_clip_skip=12) == ([], [])  # unchanged file: nothing to say

    data = json.loads(cfg.read_text())
    data.update(save_every_n_epochs=0, min_snr_gamma=5, zero_frequency_noise_ratio=0.1, save_optimizer=True,
                batch_size=4, clip_skip=3)
    write_json(cfg, data)
    changes, warnings = config.reload_live_settings(args, max_clip_skip=12)
    assert args.save_every_n_epochs is None  # <1 means never, as at startup
    assert (args.min_snr_gamma, args.zero_frequency_noise_ratio, args.save_optimizer) == (5, 0.1, True)
    assert args.batch_size == 2 and args.clip_skip == 2  # not live / given on the command line
    assert sorted(line.split(": ")[1].split()[0] for line in changes) == [
        "min_snr_gamma", "save_every_n_epochs", "save_optimizer", "zero_frequency_noise_ratio"]
    assert any("min_snr_gamma null -> 5" in line for line in changes)
    assert len(warnings) == 2
    assert any("'batch_size' changed to 4" in w and "restarted" in w for w in warnings)
    assert any("'clip_skip' changed to 3" in w and "command line" in w for w in warnings)
    assert config.reload_live_settings(args, max_clip_skip=12) == ([], [])  # each change is told once

    del data["min_snr_gamma"]  # a key removed from the file goes back to its default
    write_json(cfg, data)
    assert config.reload_live_settings(args, max_clip_skip=12)[0] == [f"{cfg}: min_snr_gamma 5.0 -> null"]
    assert args.min_snr_gamma is None


def test_a_half_saved_or_invalid_file_keeps_every_previous_setting(tmp_path, small_dataset):
    cfg, args = _start(tmp_path, small_dataset, min_snr_gamma=5)
    before = dict(vars(args))
    good = cfg.read_text()
    broken_versions = {
        "half-saved": good[: len(good) // 2],
        "empty": "",
        "wrong type": good.replace('"min_snr_gamma": 5', '"min_snr_gamma": "five"'),
        "out of range": good.replace('"min_snr_gamma": 5', '"min_snr_gamma": -1'),
        "unknown key": good.replace('"min_snr_gamma"', '"min_snr_gama"'),
        "not an object": "[1, 2]",
    }
    for what, text in broken_versions.items():
        cfg.write_text(text.replace('"save_every_n_epochs": 10', '"save_every_n_epochs": 3'))
        changes, warnings = config.reload_live_settings(args, max_clip_skip=12)
        assert changes == [] and len(warnings) == 1 and "keeping the previous ones" in warnings[0], what
        assert str(cfg) in warnings[0], what
        assert vars(args) == before, what
    cfg.unlink()
    assert "keeping the previous ones" in config.reload_live_settings(args, max_clip_skip=12)[1][0]
    write_json(cfg, {**json.loads(good), "clip_skip": 4})
    warnings = config.reload_live_settings(args, max_clip_skip=3)[1]
    assert "reaches past the text encoder's 3 layers" in warnings[0] and vars(args) == before


def test_an_edit_during_a_run_applies_from_the_next_epoch(tmp_path, small_dataset):
    """A real run: the file is edited while epoch 0 trains; epoch 1 picks the edit up and saves per the new cadence."""
    import train

    logdir = tmp_path / "logs"
    cfg = write_json(tmp_path / "train.json", {
        "resume_ckpt": str(TINY_MODEL), "data_root": str(small_dataset), "resolution": 128, "batch_size": 1,
        "optimizer_config": str(REPO / "cfgs" / "tiny_optimizer.json"), "sample_steps": 0, "logdir": str(logdir),
        "max_epochs": 3, "load_settings_every_epoch": True, "write_schedule": True, "save_every_n_epochs": 10,
        "save_full_precision": False, "no_save_ckpt": True, "run_name": "live"})
    edited = threading.Event()

    def edit_once_epoch_0_started():
        # write_schedule writes ep0's schedule right after epoch 0's reload: an edit from then on is epoch 1's.
        deadline = time.monotonic() + 300
        while not list(logdir.glob("myproj_*/ep0_batch_schedule.txt")) and time.monotonic() < deadline:
            time.sleep(0.005)
        data = json.loads(cfg.read_text())
        data.update(save_every_n_epochs=1, max_epochs=50)
        write_json(cfg, data)
        edited.set()

    editor = threading.Thread(target=edit_once_epoch_0_started)
    editor.start()
    assert train.main(["--config", str(cfg)]) == 0
    editor.join()
    assert edited.is_set()

    (run,) = logdir.glob("myproj_*")  # run_name names the run, not its folder (as in EveryDream2)
    log_text = (run / f"{run.name}.log").read_text()
    assert "Epoch 1: settings changed:" in log_text and "save_every_n_epochs 10 -> 1" in log_text
    assert "'max_epochs' changed to 50" in log_text
    assert "Epoch 0: settings changed" not in log_text
    # Saves per the new cadence after epochs 2 (the last epoch's save is the final one), none after epoch 1.
    assert sorted(p.name for p in (run / "ckpts").iterdir()) == ["last-myproj-ep03-gs00024", "myproj-ep02-gs00016"]
