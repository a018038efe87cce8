"""Every config file EveryDream2 ships runs here unchanged except for its paths (doc/FROM_EVERYDREAM2.md).

tests/fixtures/everydream2/ holds EveryDream2's shipped files byte for byte, laid out as in its repository
(victorchall/EveryDream2trainer at 5098db8325c2b5951b342156556b938b642a0338): train.json, trainSD21.json, the chain
files and chain.bat, cfgs/train_coco.json, the optimizer, sample and validation files they name, and
plugins/accumulnator.json. Each test copies that folder into a temporary working directory, as a user who copied
their EveryDream2 files over would have it, and runs train.main there. The command line overrides only the paths
(resume_ckpt -> the tiny bundled model, data_root, logdir) and what keeps a run a few seconds long on CPU: one
epoch, 64 px, batch 2, no samples before training. Everything else comes from the files, and the tests check that
it did: the options each run recorded, its optimizer settings, its validation curves, its checkpoints, its samples.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_MODEL, read_scalars, read_wandb, wandb_scalars
from utils.options.flags import LEGACY_KEYS

ED2 = REPO / "tests" / "fixtures" / "everydream2"
# The options of EveryDream2's train.py at that commit (its argparse, `--config` aside).
ED2_TRAIN_PY_OPTIONS = (
    "amp", "attn_type", "batch_size", "ckpt_every_n_minutes", "clip_grad_norm", "clip_skip", "cond_dropout",
    "data_root", "disable_amp", "disable_textenc_training", "disable_unet_training", "embedding_perturbation",
    "flip_p", "gpuid", "gradient_checkpointing", "grad_accum", "logdir", "log_step", "loss_type", "lr",
    "lr_decay_steps", "lr_scheduler", "lr_warmup_steps", "max_epochs", "no_prepend_last", "no_save_ckpt",
    "optimizer_config", "plugins", "project_name", "resolution", "resume_ckpt", "run_name", "sample_prompts",
    "sample_steps", "save_ckpt_dir", "save_every_n_epochs", "save_ckpts_from_n_epochs", "save_full_precision",
    "save_optimizer", "seed", "shuffle_tags", "timestep_start", "timestep_end", "train_sampler", "keep_tags", "wandb",
    "validation_config", "write_schedule", "rated_dataset", "rated_dataset_target_dropout_percent",
    "zero_frequency_noise_ratio", "enable_zero_terminal_snr", "load_settings_every_epoch", "min_snr_gamma",
    "ema_decay_rate", "ema_strength_target", "ema_update_interval", "ema_device", "ema_sample_nonema_model",
    "ema_sample_ema_model", "ema_resume_model", "pyramid_noise_discount")
SHORT = ("--logdir", "logs", "--max_epochs", "1", "--resolution", "64", "--batch_size", "2")
OVERRIDDEN = {"resume_ckpt", "data_root", "logdir", "max_epochs", "resolution", "batch_size",
              "generate_pretrain_samples"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Four captioned 64x64 training images (`train/`) and two validation images (`val/`), shared by every run."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    for folder, count in (("train", 4), ("val", 2)):
        (root / folder).mkdir()
        for i in range(count):
            colour, caption = ((220, 30, 30), "a red square") if i % 2 else ((30, 30, 220), "a blue square")
            Image.new("RGB", (64, 64), colour).save(root / folder / f"img_{i}.png")
            (root / folder / f"img_{i}.txt").write_text(caption)
    return root


@pytest.fixture
def ed2_dir(tmp_path, monkeypatch) -> Path:
    """The working directory: EveryDream2's files where its users keep them."""
    work = tmp_path / "ed2"
    shutil.copytree(ED2, work)
    monkeypatch.chdir(work)
    return work


def train(config: str, images: Path, *flags: str, resume: str | Path | None = TINY_MODEL) -> int:
    import train as train_module

    resume_flag = ("--resume_ckpt", str(resume)) if resume is not None else ()
    return train_module.main(["--config", config, *resume_flag, "--data_root", str(images / "train"), *SHORT,
                              *flags])


def the_run(project: str) -> Path:
    (run,) = Path("logs").glob(f"{project}_*")
    return run


def check_run(config: str, *flags: str, validated: bool = True) -> Path:
    """The run of `config` with `flags` took its settings from the files: the options it recorded are the file's
    (except those the flags override and EveryDream2's keys that do nothing here), its optimizers are the
    optimizer file's (with EveryDream2's precedence: a main lr wins for both models), validation ran, and a final
    checkpoint was saved."""
    settings = json.loads(Path(config).read_text())
    overridden = OVERRIDDEN | {re.sub(r"^--(no-)?", "", flag) for flag in flags if flag.startswith("--")}
    run = the_run(settings["project_name"])
    recorded = json.loads((run / f"{run.name}_main.json").read_text())
    assert set(settings) - set(recorded) <= set(LEGACY_KEYS)
    for key, value in settings.items():
        if key in recorded and key not in overridden | set(LEGACY_KEYS) and value is not None and \
                not (key == "seed" and value == -1):
            assert recorded[key] == value, key

    optimizer_file = json.loads(Path(recorded["optimizer_config"]).read_text())
    base, te = optimizer_file["base"], optimizer_file["text_encoder_overrides"]
    resolved = json.loads((run / f"{run.name}_opt.json").read_text())
    unet_lr = settings.get("lr") or base["lr"]
    assert (resolved["unet"]["optimizer"], resolved["unet"]["lr"]) == (base["optimizer"], unet_lr)
    assert resolved["unet"]["lr_scheduler"] == base["lr_scheduler"]
    if not settings.get("disable_textenc_training"):
        assert resolved["text_encoder"]["optimizer"] == (te["optimizer"] or base["optimizer"])
        assert resolved["text_encoder"]["lr"] == (settings.get("lr") or te["lr"] or unet_lr)
        assert resolved["text_encoder"]["lr_scheduler"] == (te["lr_scheduler"] or base["lr_scheduler"])

    scalars = read_scalars(run)
    if validated:
        assert [step for step, _ in scalars["loss/val"]] == [0, scalars["loss/epoch"][-1][0]]
    (final,) = (p for p in (run / "ckpts").glob(f"last-{settings['project_name']}-ep01-gs*") if p.is_dir())
    assert (final / "model_index.json").is_file() and final.with_name(f"{final.name}.safetensors").is_file()
    return run


def test_the_fixtures_are_everydream2s_files_as_shipped():
    shipped = sorted(str(p.relative_to(ED2)) for p in ED2.rglob("*") if p.is_file())
    assert shipped == ["cfgs/train_coco.json", "cfgs/validation_coco.json", "chain.bat", "chain0.json", "chain1.json",
                       "chain2.json", "optimizer.json", "optimizerSD21.json", "optimizer_dadapt.json",
                       "plugins/accumulnator.json", "sample_prompts.json", "sample_prompts.txt", "train.json",
                       "trainSD21.json", "validation_default.json"]
    # A few bytes that an "improved" copy would have lost.
    assert '"resume_ckpt": "panopstor/EveryDream"' in (ED2 / "train.json").read_text()
    assert '"cfgs": [1,11],      \n' in (ED2 / "sample_prompts.json").read_text()
    assert (ED2 / "sample_prompts.txt").read_bytes() == b""
    assert '"validate_training":"true"' in (ED2 / "cfgs" / "validation_coco.json").read_text()


def test_train_json_with_its_sample_prompts_json(ed2_dir, images):
    """train.json (optimizer.json, validation_default.json) with EveryDream2's sample_prompts.json, whose third sample
    sets its own cfgs: the file is checked at startup and accepted (it stopped the run with "samples[2]: unknown key
    'cfgs'" before). No samples are rendered: its 640x384 sample at 15 steps takes minutes on CPU; the rendering of
    a sample's own cfgs is tested at 64 px in tests/test_sampling.py."""
    flags = ("--sample_prompts", "sample_prompts.json", "--no-generate_pretrain_samples")
    assert train("train.json", images, *flags) == 0
    run = check_run("train.json", *flags)
    assert not list((run / "samples").glob("*"))


def test_train_json_with_optimizer_dadapt(ed2_dir, images):
    flags = ("--optimizer_config", "optimizer_dadapt.json", "--no-generate_pretrain_samples")
    assert train("train.json", images, *flags) == 0
    check_run("train.json", *flags)


def test_train_sd21_json(ed2_dir, images):
    """trainSD21.json: EveryDream2's legacy keys (amp, lowvram, disable_xformers, scale_lr false), a main lr that
    overrides optimizerSD21.json's, and optimizerSD21.json's text encoder freezing."""
    assert train("trainSD21.json", images, "--no-generate_pretrain_samples") == 0
    run = check_run("trainSD21.json", "--no-generate_pretrain_samples")
    log = (run / f"{run.name}.log").read_text()
    assert "Text encoder: training" in log and "lr 2e-06 from trainSD21.json overrides" in log


def test_chain_bat_runs_chain0_then_chain1_and_chain2_from_findlast(ed2_dir, images):
    """chain.bat's three commands in order: chain0 starts from the base model, chain1 and chain2 resume the newest
    checkpoint under logdir with `findlast`, as EveryDream2's chaining guide describes."""
    configs = re.findall(r"^python train\.py --config (\S+)$", (ed2_dir / "chain.bat").read_text(), re.M)
    assert configs == ["chain0.json", "chain1.json", "chain2.json"]
    previous = None
    for config in configs:
        settings = json.loads(Path(config).read_text())
        first = settings["resume_ckpt"] != "findlast"
        assert first == (previous is None)
        before = set(Path("logs").glob("*"))
        assert train(config, images, "--no-generate_pretrain_samples", resume=TINY_MODEL if first else None) == 0
        (run,) = set(Path("logs").glob("*")) - before
        log = (run / f"{run.name}.log").read_text()
        started_from = str(TINY_MODEL) if first else f"{previous.parent.parent.name}/ckpts/{previous.name}"
        assert re.search(rf"Model: .* from \S*{re.escape(started_from)} ", log), log[:2000]
        recorded = json.loads((run / f"{run.name}_main.json").read_text())
        assert {k: recorded[k] for k in ("grad_accum", "lr", "cond_dropout", "disable_textenc_training")} == \
            {k: settings[k] for k in ("grad_accum", "lr", "cond_dropout", "disable_textenc_training")}
        (previous,) = (run / "ckpts").glob("last-*-ep01-gs*[0-9]")
    assert len(list(Path("logs").glob("myproj_ch0_*"))) == 3


def test_findlast_finds_the_previous_session_of_another_project_name(ed2_dir, images):
    earlier = Path("logs") / "myproj_ch0_20250101-000000" / "ckpts" / "last-myproj_ch0-ep01-gs00002"
    shutil.copytree(TINY_MODEL, earlier)
    assert train("chain1.json", images, "--project_name", "myproj_ch1", "--no-generate_pretrain_samples",
                 resume=None) == 0
    run = the_run("myproj_ch1")
    log = (run / f"{run.name}.log").read_text()
    assert re.search(rf"Model: .* from \S*{re.escape('myproj_ch0_20250101-000000/ckpts/' + earlier.name)} ", log)


def set_paths(path: Path, **paths: str) -> None:
    """The file with only its path values changed (each key must be in it)."""
    settings = json.loads(path.read_text())
    assert set(paths) <= set(settings)
    path.write_text(json.dumps({**settings, **paths}, indent=4))


def test_train_coco_as_shipped_with_its_manual_validation_set_and_wandb(ed2_dir, images, monkeypatch):
    """cfgs/train_coco.json names cfgs/validation_coco.json, which uses the old key names val_data_root and
    val_split_proportion and the string "true"; its val_data_root (a Windows path) is the one path changed. Its
    wandb: true logs to Weights & Biases, offline here."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    set_paths(ed2_dir / "cfgs" / "validation_coco.json", val_data_root=str(images / "val"))
    flags = ("--no-generate_pretrain_samples",)
    assert train("cfgs/train_coco.json", images, *flags) == 0
    run = check_run("cfgs/train_coco.json", *flags)
    scalars = read_scalars(run)
    assert [step for step, _ in scalars["loss/stabilize-train"]] == [step for step, _ in scalars["loss/val"]]
    assert wandb_scalars(read_wandb(run), "loss/val") == pytest.approx(dict(scalars["loss/val"])) != {}


def test_the_migration_page_covers_every_key_of_everydream2s_files():
    """doc/FROM_EVERYDREAM2.md names every key the shipped files use (train, optimizer, sample, validation and
    Accumulnator files), and every option of EveryDream2's train.py."""
    page = (REPO / "doc" / "FROM_EVERYDREAM2.md").read_text()
    keys = set()
    for path in ED2.rglob("*.json"):
        settings = json.loads(path.read_text())
        keys |= set(settings)
        for section in ("base", "text_encoder_overrides", "text_encoder_freezing"):
            keys |= set(settings.get(section) or {})
        for sample in settings.get("samples", []):
            keys |= set(sample)
    keys |= set(ED2_TRAIN_PY_OPTIONS)
    assert sorted(key for key in keys if f"`{key}`" not in page) == []


def test_plugins_accumulnator_json_is_read_from_the_working_directory(ed2_dir):
    from utils.plugins.loading import load_plugins

    [plugin] = load_plugins(["plugins.accumulnator.Accumulnator"], "train.json")
    assert plugin.config_path == ed2_dir / "plugins" / "accumulnator.json"
    assert plugin.per_epoch_grad_accum == {0: 1, 1: 1, 2: 1, 3: 1, 4: 18, 5: 34, 6: 50, 7: 67, 8: 84, 9: 100}
