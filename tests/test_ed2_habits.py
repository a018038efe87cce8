"""EveryDream2 habits (issue #17): its legacy switches and the option names its documentation uses work on the
command line and in JSON; findlast's scope; Hugging Face ids and bare names refused with the way to fix them; the
mixed precision choice; an NVIDIA GPU that torch cannot use, from facts passed in. Whole runs:
tests/e2e/test_ed2_habits_run.py."""
from __future__ import annotations

import json
import re
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import REPO, write_json
from tests.test_checkpoint import make_ckpt
from utils.options import config
from utils.options.flags import ALIASES, BY_NAME, LEGACY_KEYS
from utils.run.checkpoint import find_last, find_last_for
from utils.run.setup import NvidiaGpu, choose_precision, find_nvidia_gpu, unusable_gpu

# Every option name that ../shared/spec/REFERENCE.md (its §1.2, §1.3 and §9 tables and prose) and
# ../shared/spec/ADVANCED_TWEAKING.md mention as `--name` or as a train.json key, extracted once (see
# test_the_embedded_list_covers_the_spec, which re-extracts them where the spec is at hand), with a value for each
# that takes one (the documents' own examples where they give one).
ED2_DOC_OPTIONS = {
    "amp": None, "attn_type": "slice", "batch_size": "6", "ckpt_every_n_minutes": "10", "clip_grad_norm": "1.0",
    "clip_skip": "2", "cond_dropout": "0.1", "config": None, "data_root": None, "disable_amp": None,
    "disable_textenc_training": None, "disable_unet_training": None, "disable_xformers": None, "ed1_mode": None,
    "ema_decay_rate": "0.999", "ema_decay_resume_model": "findlast", "ema_device": "cuda",
    "ema_resume_model": "findlast", "ema_sample_ema_model": None, "ema_sample_nonema_model": None,
    "ema_strength_target": "0.10", "ema_update_interval": "50", "embedding_perturbation": "1.0",
    "enable_zero_terminal_snr": None, "flip_p": "0.5", "gpuid": "1", "grad_accum": "2",
    "gradient_checkpointing": None, "keep_tags": "4", "load_settings_every_epoch": None, "log_step": "50",
    "logdir": "/workspace/mylogs", "loss_type": "huber", "lowvram": None, "lr": "1.0e-6", "lr_decay_steps": "2500",
    "lr_scheduler": "cosine", "lr_warmup_steps": "100", "max_epochs": "50", "min_snr_gamma": "5",
    "no_prepend_last": None, "no_save_ckpt": None, "notebook": None, "optimizer_config": None,
    "plugins": "plugins.interruptible.InterruptiblePlugin", "project_name": "myproj_ch0",
    "pyramid_noise_discount": "0.4", "rated_dataset": None, "rated_dataset_target_dropout_percent": "40",
    "rectified_flow": None, "reflow_gen_batches": "10", "reflow_sample_steps": "50", "reflow_steps": "2",
    "reflow_train_epochs": "1", "resolution": "640", "resume_ckpt": None, "run_name": "first",
    "sample_prompts": "sample_prompts.json", "sample_steps": "200", "save_ckpt_dir": "r:/webui/models",
    "save_ckpts_from_n_epochs": "3", "save_every_n_epochs": "20", "save_full_precision": None,
    "save_optimizer": None, "scale_lr": None, "seed": "-1", "shuffle_tags": None, "timestep_end": "450",
    "timestep_start": "500", "train_sampler": "ddim", "useadam8bit": None, "validation_config": "validation.json",
    "wandb": None, "write_schedule": None, "zero_frequency_noise_ratio": "0.05",
}
SPEC_DIRS = (REPO.parent / "shared" / "spec", Path("/work/shared/spec"))


@pytest.fixture
def paths(tmp_path, small_dataset):
    model = tmp_path / "model"
    model.mkdir()
    return {"resume_ckpt": str(model), "data_root": str(small_dataset)}


def base_argv(paths: dict) -> list[str]:
    return ["--resume_ckpt", paths["resume_ckpt"], "--data_root", paths["data_root"]]


def spec_names(spec: Path) -> set[str]:
    """The option names REFERENCE.md and ADVANCED_TWEAKING.md mention: every `--name`, the first column of
    REFERENCE's option tables (§1.2, §9) and the keys §1.3 lists."""
    names = set()
    for file in ("REFERENCE.md", "ADVANCED_TWEAKING.md"):
        names |= set(re.findall(r"(?<![\w-])--([a-z][a-z0-9_]+)", (spec / file).read_text()))
    reference = (spec / "REFERENCE.md").read_text()

    def section(start: str, end: str) -> str:
        begin = reference.index(start)
        return reference[begin:reference.index(end, begin)]

    for table in (section("### 1.2", "### 1.3"), section("## 9.", "Behaviour:")):
        for cell in re.findall(r"^\| ([^|]+?) \|", table, re.M):
            names |= set(re.findall(r"[a-z][a-z0-9_]+", cell)) - {"key"}  # "key": the header row
    names |= set(re.findall(r"`([a-z][a-z0-9_]+)`", section("### 1.3", "## 2.")))
    return names - {"key"}  # `--key` in "CLI `--key` and train.json `"key"`"


def test_the_embedded_list_covers_the_spec():
    spec = next((d for d in SPEC_DIRS if (d / "REFERENCE.md").is_file()), None)
    if spec is None:
        pytest.skip("the spec (../shared/spec) is not beside this checkout; the embedded list stands for it")
    assert spec_names(spec) - set(ED2_DOC_OPTIONS) == set()


@pytest.mark.parametrize("name", sorted(ED2_DOC_OPTIONS))
def test_every_option_name_in_the_ed2_docs_is_accepted_on_the_command_line_and_in_json(tmp_path, paths, name):
    value = ED2_DOC_OPTIONS[name]
    if name in ("config", "resume_ckpt", "data_root", "optimizer_config"):  # paths that must exist
        value = {"config": str(write_json(tmp_path / "train.json", {"max_epochs": 7})),
                 "optimizer_config": str(REPO / "cfgs" / "tiny_optimizer.json")}.get(name) or paths[name]
        argv, json_value = [f"--{name}", value], value
    elif value is None:  # a switch
        argv, json_value = [f"--{name}"], True
    else:
        argv = [f"--{name}", value]
        json_value = [value] if name == "plugins" else \
            json.loads(value) if re.fullmatch(r"-?[\d.e-]+", value) else value
    option = ALIASES.get(name, name)
    flag = BY_NAME.get(option)
    for how, args_of in (("command line", lambda: config.load(base_argv(paths) + argv)),
                         ("json", lambda: config.load(["--config", str(write_json(
                             tmp_path / "cfg.json", {**paths, name: json_value}))]))):
        if how == "json" and name == "config":
            continue
        args = args_of()
        if name == "config":
            assert args.max_epochs == 7
        elif name in LEGACY_KEYS:
            assert len([note for note in args.notes if f"'{name}'" in note or f"'--{name}'" in note]) == 1, how
        elif flag.type is bool:
            assert getattr(args, option) is True, how
        elif name != "seed":  # seed -1 is replaced by a random seed
            expected = [value] if flag.type is list else flag.type(value) if flag.type in (int, float) else value
            assert getattr(args, option) == expected, how


# What each EveryDream2 switch's note must point to.
REPLACEMENTS = {"amp": "mixed_precision", "useadam8bit": '"optimizer": "adamw8bit"', "lowvram": "cfgs/lowvram.json",
                "disable_xformers": "attn_type", "ed1_mode": "detected from the model", "notebook": "no effect"}


@pytest.mark.parametrize("name", sorted(LEGACY_KEYS))
def test_legacy_switches_give_one_note_saying_what_replaces_them(tmp_path, paths, name):
    assert set(REPLACEMENTS) == set(LEGACY_KEYS)
    plain = config.load(base_argv(paths))
    on_cli = config.load(base_argv(paths) + [f"--{name}"])
    assert len(on_cli.notes) == 1 and f"command line: '--{name}' is an EveryDream2 switch, ignored" in on_cli.notes[0]
    assert REPLACEMENTS[name] in on_cli.notes[0]
    assert config.effective_options(on_cli) == config.effective_options(plain)  # it changes nothing
    cfg = write_json(tmp_path / "train.json", {**paths, name: True})
    both = config.load(["--config", str(cfg), f"--{name}"])
    assert len(both.notes) == 1 and both.notes[0].startswith("command line:")  # once, not per source
    in_json = config.load(["--config", str(cfg)])
    assert len(in_json.notes) == 1 and in_json.notes[0].startswith(f"{cfg}: '{name}' is an EveryDream2 switch")
    silent = config.load(["--config", str(write_json(tmp_path / "off.json", {**paths, name: False}))])
    assert (len(silent.notes) == 1 and "does not turn mixed precision off" in silent.notes[0]) if name == "amp" \
        else silent.notes == []


def test_legacy_names_and_aliases_are_in_the_help_and_the_flag_doc():
    parser = config.build_parser()
    options = {opt for action in parser._actions for opt in action.option_strings}
    table = config.flag_table_markdown()
    legacy_section = table[table.index("## Legacy: EveryDream2 names"):]
    for name in [*LEGACY_KEYS, *ALIASES]:
        assert f"--{name}" in options and f"| `{name}` |" in legacy_section
    assert "| `ema_resume_model` |" in table and "Also accepted as `ema_decay_resume_model`." in table
    assert not [name for name in LEGACY_KEYS if name in BY_NAME]  # one meaning per name


def test_ema_decay_resume_model_is_ema_resume_model(tmp_path, paths):
    assert config.load(base_argv(paths) + ["--ema_decay_resume_model", "a_ema"]).ema_resume_model == "a_ema"
    args = config.load(["--config", str(write_json(tmp_path / "t.json", {**paths, "ema_decay_resume_model": "b"}))])
    assert args.ema_resume_model == "b" and args.sources["ema_resume_model"] == str(tmp_path / "t.json")
    same = write_json(tmp_path / "same.json", {**paths, "ema_resume_model": "c", "ema_decay_resume_model": "c"})
    assert config.load(["--config", str(same)]).ema_resume_model == "c"
    one_null = write_json(tmp_path / "null.json", {**paths, "ema_resume_model": None, "ema_decay_resume_model": "d"})
    assert config.load(["--config", str(one_null)]).ema_resume_model == "d"
    clash = write_json(tmp_path / "clash.json", {**paths, "ema_resume_model": "c", "ema_decay_resume_model": "e"})
    with pytest.raises(config.ConfigError, match="'ema_resume_model' and 'ema_decay_resume_model' are two names of "
                                                 "one option and are set to different values"):
        config.load(["--config", str(clash)])
    with pytest.raises(config.ConfigError, match="Did you mean 'ema_decay_resume_model'"):
        config.load(["--config", str(write_json(tmp_path / "typo.json", {**paths, "ema_decay_resum_model": "c"}))])


# ---------------------------------------------------------------- models that are not here

@pytest.mark.parametrize("hub_id", ["stabilityai/stable-diffusion-2-1-base", "panopstor/EveryDream"])
def test_a_hugging_face_id_says_how_to_download_it_by_hand(tmp_path, paths, hub_id, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config.ConfigError) as err:
        config.load(["--resume_ckpt", hub_id, "--data_root", paths["data_root"]])
    message = str(err.value)
    name = hub_id.split("/")[1]
    assert message.startswith(f"command line: resume_ckpt '{hub_id}' is not a file or folder on this machine "
                              f"(looked in {tmp_path})")
    for part in ("nothing is downloaded by this trainer", f"https://huggingface.co/{hub_id}", "`.safetensors`",
                 f"hf download {hub_id} --local-dir models/{name}",
                 f"huggingface-cli download {hub_id} --local-dir models/{name}",
                 "then set resume_ckpt to that file or folder"):
        assert part in message


def test_bare_and_missing_names_say_where_they_were_looked_for(tmp_path, paths, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(config.ConfigError) as err:
        config.load(["--resume_ckpt", "sd_v1-5_vae.ckpt", "--data_root", paths["data_root"]])
    assert f"'sd_v1-5_vae.ckpt' does not exist in the working directory ({tmp_path})" in str(err.value)
    assert "ckpt_cache/sd_v1-5_vae.ckpt" in str(err.value) and "huggingface" not in str(err.value)
    with pytest.raises(config.ConfigError) as err:
        config.load(["--resume_ckpt", str(tmp_path / "models" / "x.safetensors"), "--data_root", paths["data_root"]])
    assert "does not exist. Give a diffusers model folder" in str(err.value) and "huggingface" not in str(err.value)


# ---------------------------------------------------------------- findlast

def test_findlast_searches_the_whole_logdir_unless_scoped_to_the_project(tmp_path):
    mine = make_ckpt(tmp_path / "a_20250101-120000" / "ckpts" / "last-a-ep01-gs00004", 30)
    mine_ema = make_ckpt(tmp_path / "a_20250101-120000" / "ckpts" / "last-a-ep01-gs00004_ema", 30)
    make_ckpt(tmp_path / "a_20250101-120000-2" / "ckpts" / "a-ep00-gs00002", 40)
    other = make_ckpt(tmp_path / "a_b_20250102-120000" / "ckpts" / "last-a_b-ep01-gs00004", 20)  # another project
    newest = make_ckpt(tmp_path / "chain2_20250103-120000" / "ckpts" / "last-chain2-ep01-gs00004", 10)
    assert find_last(tmp_path) == newest
    assert find_last(tmp_path, "a") == mine  # not a_b's, though its folder starts with "a_"
    assert find_last(tmp_path, "a_b") == other
    assert find_last(tmp_path, "a", ema=True) == mine_ema
    with pytest.raises(FileNotFoundError, match="in runs of project 'zzz' .*set it to 'logdir' to search every run"):
        find_last(tmp_path, "zzz")

    def args(scope):
        return SimpleNamespace(logdir=str(tmp_path), project_name="a", findlast_scope=scope)
    assert find_last_for(args("logdir")) == newest
    assert find_last_for(args("project")) == mine
    assert find_last_for(args("logdir"), ema=True) == find_last_for(args("project"), ema=True) == mine_ema


def test_findlast_scope_is_an_option(paths):
    assert config.load(base_argv(paths)).findlast_scope == "logdir"
    assert config.load(base_argv(paths) + ["--findlast_scope", "project"]).findlast_scope == "project"
    with pytest.raises(SystemExit):
        config.load(base_argv(paths) + ["--findlast_scope", "everywhere"])


# ---------------------------------------------------------------- precision

@pytest.mark.parametrize("setting, disable_amp, cuda, bf16, expected", [
    ("auto", False, False, False, "no"),  # the CPU: fp32
    ("auto", False, True, True, "bf16"),
    ("auto", False, True, False, "fp16"),
    ("auto", True, True, True, "no"),
    ("no", False, True, True, "no"),
    ("no", False, False, False, "no"),
    ("fp16", False, True, True, "fp16"),
    ("bf16", False, True, True, "bf16"),
])
def test_mixed_precision_choice(setting, disable_amp, cuda, bf16, expected):
    assert choose_precision(setting, disable_amp, cuda, bf16) == expected


def test_a_precision_the_device_cannot_run_is_a_clear_error(paths):
    with pytest.raises(config.ConfigError, match=r"command line: mixed_precision 'bf16', but this GPU \(Tesla T4\) "
                                                 r"does not support bf16 .* Use 'fp16' or 'auto'"):
        choose_precision("bf16", False, True, False, "Tesla T4", "command line")
    for setting in ("bf16", "fp16"):
        with pytest.raises(config.ConfigError, match=f"mixed_precision '{setting}' needs a CUDA GPU"):
            choose_precision(setting, False, False, False)
    with pytest.raises(config.ConfigError, match="disable_amp .* turns mixed precision off, but mixed_precision is "
                                                 "'bf16'"):
        config.load(base_argv(paths) + ["--disable_amp", "--mixed_precision", "bf16"])
    assert config.load(base_argv(paths) + ["--mixed_precision", "no"]).amp is False
    assert config.load(base_argv(paths)).mixed_precision == "auto"


# ---------------------------------------------------------------- an NVIDIA GPU that torch cannot use

RTX = NvidiaGpu(("NVIDIA GeForce RTX 3090",), "12.4")


def test_a_cpu_build_of_torch_beside_an_nvidia_gpu_says_how_to_install_a_cuda_build():
    message = unusable_gpu(RTX, False, "2.5.1+cpu", None)
    assert message.startswith("This machine has an NVIDIA GPU (NVIDIA GeForce RTX 3090), but the installed PyTorch "
                              "2.5.1+cpu is a CPU-only build")
    assert "pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cu124" in message
    assert "https://pytorch.org/get-started/locally/" in message and "supports CUDA up to 12.4" in message
    # The newest CUDA build the driver runs; cu124 when the driver did not say.
    assert "whl/cu128" in unusable_gpu(NvidiaGpu(("A",), "12.8"), False, "2.7.0+cpu", None)
    assert "whl/cu130" in unusable_gpu(NvidiaGpu(("A",), "13.1"), False, "2.7.0+cpu", None)
    assert "whl/cu121" in unusable_gpu(NvidiaGpu(("A",), "12.2"), False, "2.7.0+cpu", None)
    assert "whl/cu124" in unusable_gpu(NvidiaGpu(), False, "2.7.0+cpu", None)


def test_a_cuda_build_the_driver_cannot_run_says_so():
    message = unusable_gpu(NvidiaGpu(("A100",), "11.4"), False, "2.5.1+cu124", "12.4")
    assert "PyTorch 2.5.1+cu124 (built for CUDA 12.4) cannot use it" in message
    assert "driver supports CUDA up to 11.4, older than torch's CUDA 12.4: update the driver" in message
    assert "no current torch build runs on it" in message and "--index-url" not in message
    newer = unusable_gpu(NvidiaGpu(("A",), "12.6"), False, "2.14.1+cu130", "13.0")
    assert "older than torch's CUDA 13.0: update the driver, or install" in newer and "whl/cu126`" in newer
    assert "torch.cuda.init()" in unusable_gpu(NvidiaGpu(("A100",), "12.4"), False, "2.5.1+cu124", "12.4")


@pytest.mark.parametrize("gpu, cuda_available, visible", [
    (None, False, None),  # no NVIDIA GPU: CI, a laptop, a Mac
    (RTX, True, None),  # a usable GPU
    (RTX, False, ""),  # GPUs hidden on purpose
    (RTX, False, "-1"),
])
def test_nothing_to_say(gpu, cuda_available, visible):
    assert unusable_gpu(gpu, cuda_available, "2.5.1+cpu", None, visible) is None


NVIDIA_SMI = """#!/bin/sh
if [ "$1" = "-L" ]; then
  echo "GPU 0: NVIDIA GeForce RTX 3090 (UUID: GPU-0000)"
  echo "GPU 1: NVIDIA RTX A6000 (UUID: GPU-0001)"
else
  echo "| NVIDIA-SMI 550.54.14    Driver Version: 550.54.14    CUDA Version: 12.4     |"
fi
"""


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script stands in for nvidia-smi")
def test_the_driver_is_found_by_nvidia_smi_or_its_proc_entry(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(NVIDIA_SMI)
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    absent = tmp_path / "no-proc"
    assert find_nvidia_gpu(str(smi), absent) == NvidiaGpu(("NVIDIA GeForce RTX 3090", "NVIDIA RTX A6000"), "12.4")
    failing = tmp_path / "failing-smi"
    failing.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver'\n"
                       "exit 9\n")
    failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
    assert find_nvidia_gpu(str(failing), absent) is None
    assert find_nvidia_gpu(str(tmp_path / "missing"), absent) is None
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14\n")
    assert find_nvidia_gpu(str(failing), proc) == NvidiaGpu()


def test_allow_cpu_is_an_option(paths):
    assert config.load(base_argv(paths)).allow_cpu is False
    assert config.load(base_argv(paths) + ["--allow_cpu"]).allow_cpu is True
