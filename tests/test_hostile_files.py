"""Hostile and broken model files: each is refused with an error that names it and says what to do, before any
output is written, and a pickle that would run code never runs it.

The files are made from the real tiny model (demo/tiny-sd): its diffusers folder copied and damaged, and a
single .safetensors written by the trainer's own save function, then cut, reshaped or stripped.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import REPO, TINY_MODEL
from utils.model import models


class RunsCode:
    """Unpickling this calls os.system, which would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def tiny_single_file(tmp_path_factory) -> Path:
    """The tiny model as one .safetensors in the original SD layout, written by the trainer's save function."""
    tiny = models.load(TINY_MODEL)
    file = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    models.save_single_file(tiny, tiny.unet, tiny.text_encoder, file, full_precision=True)
    return file


def tiny_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    shutil.copytree(TINY_MODEL, folder)
    return folder


def refused(path: Path, *fragments: str) -> str:
    """Loads `path`, expecting a ModelLoadError that names it and contains every fragment; returns the message."""
    with pytest.raises(models.ModelLoadError) as caught:
        models.load(path)
    message = str(caught.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------- pickles that would run code

def evil_ckpt(tmp_path: Path, layout: str) -> Path:
    """A .ckpt whose weights sit next to an object that runs `touch <marker>` when unpickled: as torch.save writes
    it (zip), or as a bare protocol-2 pickle (the layout of torch's legacy format; plain numbers stand in for the
    weights, since pickle.dump writes a tensor as a call of torch code, refused before the payload is reached)."""
    file = tmp_path / f"evil_{layout}.ckpt"
    if layout == "zip":
        torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)},
                    "extra": RunsCode(tmp_path / "pwned")}, file)
    else:
        with open(file, "wb") as f:
            pickle.dump({"state_dict": {"model.diffusion_model.out.2.bias": [0.0] * 4},
                         "extra": RunsCode(tmp_path / "pwned")}, f, protocol=2)
    return file


def test_the_hostile_ckpt_is_a_working_exploit(tmp_path):
    """Keeps the tests below honest: loaded without torch's weights-only reader, the file does run its code."""
    torch.load(evil_ckpt(tmp_path, "zip"), weights_only=False)
    assert (tmp_path / "pwned").exists()


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_ckpt_whose_pickle_would_run_code_is_refused_and_the_code_never_runs(tmp_path, layout):
    file = evil_ckpt(tmp_path, layout)
    message = refused(file, "refused", "posix.system" if os.name == "posix" else "system",
                      "Use the model's .safetensors download")
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message  # torch's advice
    assert not (tmp_path / "pwned").exists()


def test_pickled_weights_in_a_diffusers_folder_are_held_to_the_same_rule(tmp_path):
    folder = tiny_folder(tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": RunsCode(tmp_path / "pwned")}, folder / "unet" / "diffusion_pytorch_model.bin")
    refused(folder, "refused", "system")
    assert not (tmp_path / "pwned").exists()


def test_optimizer_state_that_would_run_code_is_skipped_with_a_warning(tmp_path, caplog):
    folder = tiny_folder(tmp_path)
    torch.save({"state": RunsCode(tmp_path / "pwned"), "param_groups": []}, folder / "optimizer_unet.pt")
    torch.save([1, 2, 3], folder / "optimizer_te.pt")
    with caplog.at_level(logging.WARNING):
        assert models.load_optimizer_states(folder) == {}
    assert not (tmp_path / "pwned").exists()
    assert f"{folder / 'optimizer_unet.pt'}: cannot read the saved optimizer state (refused" in caplog.text
    assert f"{folder / 'optimizer_te.pt'}: not a saved optimizer state" in caplog.text


def test_a_lightning_training_checkpoint_is_read_not_refused(tmp_path):
    """Original SD .ckpt files (saved by PyTorch Lightning) name Lightning's ModelCheckpoint class as a dictionary
    key beside the weights. That name alone is let through as an inert stand-in; the file is then judged on its
    weights (here: too few to be a model, which the message says), not refused as code."""
    module_name = "pytorch_lightning.callbacks.model_checkpoint"
    module = types.ModuleType(module_name)
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": module_name})
    module.ModelCheckpoint = model_checkpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", module_name]
    for name in names:  # importable just long enough for pickle to write the reference
        sys.modules[name] = module if name == module_name else types.ModuleType(name)
    try:
        file = tmp_path / "lightning.ckpt"
        torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "global_step": 470000,
                    "callbacks": {model_checkpoint: {"best_model_score": torch.tensor(0.1), "best_model_path": "x"}}},
                   file)
    finally:
        for name in names:
            del sys.modules[name]
    message = refused(file, "not a Stable Diffusion 1.x/2.x checkpoint")
    assert "refused" not in message


# ---------------------------------------------------------------- broken and wrong single files

def test_truncated_safetensors(tmp_path, tiny_single_file):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_single_file.read_bytes()[:tiny_single_file.stat().st_size // 2])
    refused(cut, "cannot read this checkpoint", "truncated")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    refused(empty, "cannot read this checkpoint")


@pytest.mark.parametrize("junk", [b"", os.urandom(4096), b"PK\x03\x04" + os.urandom(200)])
def test_ckpt_that_is_not_a_checkpoint(tmp_path, junk):
    file = tmp_path / "junk.ckpt"
    file.write_bytes(junk)
    refused(file, "cannot read this checkpoint")


@pytest.mark.parametrize("content, kind", [([torch.zeros(2)], "list"), ({"state_dict": torch.zeros(2)}, "Tensor")])
def test_ckpt_holding_something_other_than_named_weights(tmp_path, content, kind):
    file = tmp_path / "odd.ckpt"
    torch.save(content, file)
    refused(file, "not a model checkpoint", f"holds a {kind}")


def test_wrong_architectures(tmp_path, tiny_single_file):
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(8, 8)}, unrelated)
    refused(unrelated, "not a Stable Diffusion 1.x/2.x checkpoint", "SDXL, SD3")

    # SDXL's UNet has no attention in its second input block and conditions on two text encoders.
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 2048),
               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(8)}, sdxl)
    refused(sdxl, "not a Stable Diffusion 1.x/2.x checkpoint")

    tensors = load_file(tiny_single_file)
    with safe_open(tiny_single_file, framework="pt") as f:
        metadata = f.metadata()
    key = "model.diffusion_model.input_blocks.0.0.weight"
    reshaped = tmp_path / "reshaped.safetensors"
    save_file({**tensors, key: torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])}, reshaped, metadata)
    refused(reshaped, "diffusers could not load it", "expected shape", "another architecture")
    assert "ignore_mismatched_sizes" not in refused(reshaped)  # diffusers' advice to programmers is left out

    stripped = tmp_path / "stripped.safetensors"
    save_file({k: v for k, v in tensors.items() if k != key}, stripped, metadata)
    refused(stripped, "weights the model needs are missing")


def test_damaged_metadata_and_yaml_beside_the_file(tmp_path, tiny_single_file):
    tensors = load_file(tiny_single_file)
    with safe_open(tiny_single_file, framework="pt") as f:
        configs = json.loads(f.metadata()[models.CONFIG_METADATA_KEY])
    for name, text in (("not_json", "{unet: "), ("no_parts", '{"unet": 5}'),
                       ("odd_tokenizer", json.dumps({**configs, "tokenizer": "../../etc"})),
                       ("pipeline_as_scheduler", json.dumps({**configs, "scheduler": {
                           **configs["scheduler"], "_class_name": "StableDiffusionPipeline"}}))):
        file = tmp_path / f"{name}.safetensors"
        save_file(tensors, file, {models.CONFIG_METADATA_KEY: text})
        refused(file, "metadata", "Use another copy of the")

    # An SD2-shaped file without our metadata takes its prediction type from a yaml beside it.
    sd2 = tmp_path / "sd2.safetensors"
    save_file({models.SD2_PROBE_KEY: torch.zeros(320, 1024)}, sd2)
    for yaml_text in (b"\xff\xfe\x00binary", b"model: [1, 2]", b"model:\n  params: [v]\n", b"{{{{"):
        sd2.with_suffix(".yaml").write_bytes(yaml_text)
        with pytest.raises(models.ModelLoadError) as caught:
            models.load(sd2)
        message = str(caught.value)
        assert message.startswith(f"{sd2.with_suffix('.yaml')}: not a readable model yaml"), message
        assert "Fix or remove it" in message


# ---------------------------------------------------------------- broken diffusers folders

def remove(relative: str):
    def damage(folder: Path):
        target = folder / relative
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return damage


def overwrite(relative: str, content: bytes):
    def damage(folder: Path):
        (folder / relative).write_bytes(content)
    return damage


def truncate(relative: str):
    def damage(folder: Path):
        data = (folder / relative).read_bytes()
        (folder / relative).write_bytes(data[:len(data) // 2])
    return damage


BROKEN_FOLDERS = {
    "no unet folder": (remove("unet"), "(missing unet)"),
    "nothing but model_index.json": (
        lambda folder: [remove(part)(folder) for part in ("unet", "vae", "text_encoder", "scheduler", "tokenizer")],
        "(missing unet, vae, text_encoder, scheduler)"),
    "no unet config": (remove("unet/config.json"), "(missing unet/config.json)"),
    "no unet weights": (remove("unet/diffusion_pytorch_model.safetensors"),
                        "missing unet/diffusion_pytorch_model.safetensors"),
    "no text encoder weights": (remove("text_encoder/model.safetensors"), "missing text_encoder/model.safetensors"),
    "no model_index.json": (remove("model_index.json"), "missing model_index.json"),
    "no scheduler config": (remove("scheduler/scheduler_config.json"), "missing scheduler/scheduler_config.json"),
    "corrupt unet config": (overwrite("unet/config.json", b'{"sample_size": '), "unet/config.json"),
    "unet config of another shape": (
        lambda folder: (folder / "unet" / "config.json").write_text(json.dumps(
            json.loads((folder / "unet" / "config.json").read_text()) | {"block_out_channels": [64, 128]})),
        "expected shape"),
    "truncated unet weights": (truncate("unet/diffusion_pytorch_model.safetensors"), "could not load the model"),
    "truncated text encoder weights": (truncate("text_encoder/model.safetensors"), "could not load the model"),
    "corrupt scheduler config": (overwrite("scheduler/scheduler_config.json", b"\x00\xff"), "could not load"),
    "scheduler config is a list": (overwrite("scheduler/scheduler_config.json", b"[1]"), "not a JSON object"),
    "scheduler config names a pipeline": (
        overwrite("scheduler/scheduler_config.json", b'{"_class_name": "DiffusionPipeline"}'),
        "not a diffusers scheduler"),
    "corrupt tokenizer": (overwrite("tokenizer/vocab.json", b"{1: 2"), "could not load the model"),
}


@pytest.mark.parametrize("name", BROKEN_FOLDERS)
def test_broken_diffusers_folder(tmp_path, name):
    damage, fragment = BROKEN_FOLDERS[name]
    folder = tiny_folder(tmp_path)
    damage(folder)
    with pytest.raises(models.ModelLoadError) as caught:
        models.load(folder)
    message = str(caught.value)
    assert str(folder) in message and fragment in message, message


# ---------------------------------------------------------------- as a user meets them: train.py

def hostile_resume_ckpt(kind: str, tmp_path: Path, tiny_single_file: Path) -> tuple[Path, str]:
    """(resume_ckpt, what the error must say) for each kind of bad model train.py is given."""
    if kind == "code":
        return evil_ckpt(tmp_path, "zip"), "refused"
    if kind == "truncated":
        cut = tmp_path / "cut.safetensors"
        cut.write_bytes(tiny_single_file.read_bytes()[:100_000])
        return cut, "truncated"
    if kind == "wrong architecture":
        other = tmp_path / "other.safetensors"
        save_file({"conditioner.embedders.0.weight": torch.zeros(2)}, other)
        return other, "not a Stable Diffusion 1.x/2.x checkpoint"
    folder = tiny_folder(tmp_path)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    return folder, "missing vae/diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("kind", ["code", "truncated", "wrong architecture", "incomplete folder"])
def test_train_stops_with_exit_code_2_and_writes_nothing(tmp_path, capfd, small_dataset, tiny_single_file, kind):
    import train

    resume, says = hostile_resume_ckpt(kind, tmp_path, tiny_single_file)
    logdir, single = tmp_path / "logs", tmp_path / "single"
    status = train.main(["--resume_ckpt", str(resume), "--data_root", str(small_dataset), "--resolution", "128",
                         "--optimizer_config", str(REPO / "cfgs" / "tiny_optimizer.json"), "--logdir", str(logdir),
                         "--save_ckpt_dir", str(single)])
    out, err = capfd.readouterr()
    assert status == 2
    (error_line,) = [line for line in out.splitlines() if line.startswith("error: ")]
    assert str(resume) in error_line and says in error_line, error_line
    assert "Traceback" not in out + err
    assert not logdir.exists() and not single.exists()
    assert not (tmp_path / "pwned").exists()
