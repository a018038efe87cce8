"""Data-parallel training over several processes (issue #10), on CPU with the gloo backend.

The unit tests split real epoch plans and real loader batches between processes without starting any; the
end-to-end tests launch train.py under torchrun with two processes and compare it with one process training
the same global batch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
from data.batching import process_share
from data.records import DEFAULT_BATCH_ID, Caption, ImageRecord
from tests.conftest import REPO, TINY_MODEL, read_scalars, read_wandb, wandb_scalars, write_json

BUCKETS = [(512, 512), (576, 448), (448, 576)]


def record(i: int, bucket, **kw) -> ImageRecord:
    return ImageRecord(path=f"/data/img{i}.jpg", caption=Caption(f"img{i}"), width=bucket[0], height=bucket[1],
                       bucket=bucket, **kw)


def mixed_records() -> list[ImageRecord]:
    """Three buckets, two named batch groups (one not a multiple of any batch size), repeats and a fraction."""
    return ([record(i, BUCKETS[0]) for i in range(9)]
            + [record(i, BUCKETS[1], batch_id="horses") for i in range(9, 14)]
            + [record(i, BUCKETS[2], multiply=2.0) for i in range(14, 17)]
            + [record(i, BUCKETS[0], batch_id="cats", multiply=1.5) for i in range(17, 21)]
            + [record(21, BUCKETS[2])])


def real_slots(share: list[data.Batch]) -> list[int]:
    """The record indices a process trains that are not runt padding (slots below the planned runt size)."""
    return [i for batch in share for slot, i in enumerate(batch.indices, start=batch.first_slot)
            if not batch.runt_size or slot < batch.runt_size]


@pytest.mark.parametrize("per_process, processes, grad_accum", [(2, 2, 1), (1, 4, 3), (3, 2, 2)])
def test_process_shares_cover_each_planned_image_once_with_one_bucket_and_batch_id_per_step(
        per_process, processes, grad_accum):
    records = mixed_records()
    for epoch in range(3):
        plan = data.build_epoch_batches(records, per_process * processes, seed=11, epoch=epoch, grad_accum=grad_accum)
        shares = [process_share(plan, rank, processes) for rank in range(processes)]
        assert all(len(share) == len(plan) for share in shares)
        for step, planned in enumerate(plan):
            parts = [share[step] for share in shares]
            assert all(len(p.indices) == per_process for p in parts)
            # Whole batches of one bucket and one batch group on every process, the runt counted as planned.
            assert {(p.bucket, p.batch_id, p.runt_size) for p in parts} == \
                {(planned.bucket, planned.batch_id, planned.runt_size)}
            assert {records[i].bucket for p in parts for i in p.indices} == {planned.bucket}
            if planned.batch_id != DEFAULT_BATCH_ID:
                assert {records[i].batch_id for p in parts for i in p.indices} == {planned.batch_id}
            # Rank r holds slots [r x b, (r + 1) x b): together, the planned batch in order.
            assert [p.first_slot for p in parts] == [rank * per_process for rank in range(processes)]
            assert sum((p.indices for p in parts), ()) == planned.indices
        # Each image once per epoch over all processes, repeated as multiply says (the 4 "cats" of multiply
        # 1.5: 6 times between them, each at least once).
        trained = Counter(i for share in shares for i in real_slots(share))
        assert trained == Counter(data.epoch_items(records, 11, epoch, random.Random(11 + epoch)))
        assert all(trained[i] == 1 for i in [*range(14), 21]) and all(trained[i] == 2 for i in range(14, 17))
        assert all(trained[i] >= 1 for i in range(17, 21)) and sum(trained[i] for i in range(17, 21)) == 6


def test_one_process_trains_the_plan_itself_and_an_uneven_split_is_refused():
    plan = data.build_epoch_batches(mixed_records(), 4, seed=3, epoch=0)
    assert process_share(plan, 0, 1) == plan
    with pytest.raises(ValueError, match="cannot be split evenly over 3 processes"):
        process_share(plan, 0, 3)
    with pytest.raises(ValueError, match="rank 2 is not one of 2"):
        process_share(plan, 2, 2)


@pytest.fixture(scope="module")
def tiny():
    from utils.model import models

    model = models.load(TINY_MODEL)
    return model, model.noise_scheduler("ddpm")


def test_process_loaders_yield_the_rows_of_the_one_process_batch(small_dataset, tiny):
    """Crop, flip, tag order and caption dropout are drawn per planned slot, so two processes' batches stacked
    are the batch one process loads for the whole plan."""
    model, _ = tiny
    (small_dataset / "img_3.txt").write_text("a red square, shiny, small, centred, bright")
    records = data.assign_buckets(data.scan(small_dataset).records, 128)
    plan = data.build_epoch_batches(records, 4, seed=5, epoch=1)
    options = dict(cond_dropout=0.3, seed=5, epoch=1, flip_p=0.5, shuffle_tags=True)
    whole = list(data.make_epoch_loader(plan, records, model.tokenizer, **options))
    halves = [list(data.make_epoch_loader(process_share(plan, rank, 2), records, model.tokenizer, **options))
              for rank in range(2)]
    for step, batch in enumerate(whole):
        first, second = halves[0][step], halves[1][step]
        assert torch.equal(torch.cat([first["pixel_values"], second["pixel_values"]]), batch["pixel_values"])
        assert first["captions"] + second["captions"] == batch["captions"]
        assert first["runt_size"] == second["runt_size"] == batch["runt_size"]
    # Numbering the second process's slots from 0 instead would draw other captions: the check above has teeth.
    renumbered = [dataclasses.replace(b, first_slot=0) for b in process_share(plan, 1, 2)]
    assert [b["captions"] for b in data.make_epoch_loader(renumbered, records, model.tokenizer, **options)] != \
        [b["captions"] for b in halves[1]]


@pytest.mark.parametrize("runt_size, rectified_flow", [(0, False), (3, True)])
def test_process_losses_average_to_the_loss_of_the_global_batch(tiny, runt_size, rectified_flow):
    """Every random draw of the step (VAE sample, embedding perturbation, offset and pyramid noise, timesteps) is
    made for the global batch and sliced, and a runt is weighed by the global batch size: the mean of two
    processes' losses, and of their gradients (what DDP averages), equals one process's on the whole batch."""
    from types import SimpleNamespace

    from utils.objective.step import BatchShare, StepSettings, compute_loss

    model, scheduler = tiny
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(4, 3, 64, 64, generator=generator) * 2 - 1,
             "input_ids": model.tokenizer(["a red circle", "a blue square", "a green triangle", "a red circle"],
                                          padding="max_length", max_length=77, return_tensors="pt").input_ids,
             "loss_scale": torch.tensor([1.0, 0.5, 2.0, 1.0]), "runt_size": runt_size}
    options = dict(loss_type="mse", zero_frequency_noise_ratio=0.1, timestep_start=0, timestep_end=1000,
                   pyramid_noise_discount=0.3, embedding_perturbation=0.5, min_snr_gamma=5.0, clip_skip=0,
                   rectified_flow=rectified_flow, masked_loss_unmasked_weight=0.0)

    def loss_and_grads(rows: slice, batch_size: int, share: BatchShare):
        part = {key: value[rows] if torch.is_tensor(value) else value for key, value in batch.items()}
        model.unet.zero_grad()
        torch.manual_seed(7)
        loss = compute_loss(model.unet, model.text_encoder, model.vae, scheduler, part,
                            StepSettings.from_args(SimpleNamespace(batch_size=batch_size, **options)), share=share)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.unet.parameters()]

    whole_loss, whole_grads = loss_and_grads(slice(0, 4), 4, BatchShare())
    (loss_0, grads_0), (loss_1, grads_1) = (loss_and_grads(slice(2 * r, 2 * r + 2), 2, BatchShare(r, 2))
                                            for r in range(2))
    torch.testing.assert_close((loss_0 + loss_1) / 2, whole_loss, rtol=1e-5, atol=0)
    for whole, g0, g1 in zip(whole_grads, grads_0, grads_1):
        torch.testing.assert_close((g0 + g1) / 2, whole, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(loss_0, loss_1)  # the halves really differ: the test compares different rows
    model.unet.zero_grad(set_to_none=True)


def test_batch_share_slices_what_one_process_draws():
    from utils.objective.step import BatchShare

    torch.manual_seed(3)
    whole = torch.randn(6, 2)
    torch.manual_seed(3)
    share = BatchShare(rank=1, processes=3)
    mine = share.mine(torch.randn(share.whole(torch.empty(2, 2)).shape))
    assert torch.equal(mine, whole[2:4])


def test_scale_lr_counts_the_images_of_an_update_over_all_processes():
    from optimizer.optimizers import resolve_settings
    from tests.test_optimizer import main_args

    rates = {"base": {"optimizer": "adamw", "lr": 2e-6}, "text_encoder_overrides": {"lr": 1e-6}}
    settings = resolve_settings(rates, main_args(scale_lr=True, batch_size=3, grad_accum=2), steps_per_epoch=5,
                                processes=4)
    assert settings["unet"].lr == pytest.approx(2e-6 * 24 ** 0.55)
    assert settings["text_encoder"].lr == pytest.approx(1e-6 * 24 ** 0.55)


@pytest.mark.parametrize("clip_skip", [2, 3])
def test_the_layers_frozen_for_clip_skip_are_those_without_a_gradient(clip_skip):
    """DistributedDataParallel must be told which parameters get no gradient; with clip_skip, several processes
    freeze exactly the text encoder layers that one process's backward leaves without one."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from utils.run.setup import freeze_clip_skipped_layers
    from utils.objective.step import encode_text

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                            num_attention_heads=2, max_position_embeddings=8)
    text_encoder = CLIPTextModel(config)
    encode_text(text_encoder, torch.randint(0, 100, (2, 8)), clip_skip).square().sum().backward()
    without_gradient = {name for name, p in text_encoder.named_parameters() if p.grad is None}
    freeze_clip_skipped_layers(text_encoder, clip_skip)
    frozen = {name for name, p in text_encoder.named_parameters() if not p.requires_grad}
    assert frozen == without_gradient and len(frozen) == (clip_skip - 1) * 16  # 16 tensors per CLIP layer


# ---------------------------------------------------------------- torchrun, two processes (gloo)

NO_SYNC_SCRIPT = """
import json, sys
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
sys.path.insert(0, sys.argv[1])
from optimizer.optimizers import TrainingOptimizers, read_optimizer_file, resolve_settings
from utils.options import config
from utils.model import models
from utils.objective.step import StepSettings, training_step
from utils.run.setup import make_accelerator, prepare_models

args = config.load(["--resume_ckpt", sys.argv[2], "--data_root", sys.argv[3], "--optimizer_config", sys.argv[4]])
accelerator = make_accelerator(args)
model = models.load(args.resume_ckpt)
trained = prepare_models(model, args, accelerator)
optimizers = TrainingOptimizers(trained, resolve_settings(read_optimizer_file(args.optimizer_config), args, 3))
exchanges = []
for name in trained:
    setattr(model, name, accelerator.prepare(getattr(model, name)))
    getattr(model, name).register_comm_hook(None, lambda group, bucket: exchanges.append(1) or
                                            allreduce_hook(group, bucket))
torch.manual_seed(accelerator.process_index)
batch = {"pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1, "loss_scale": torch.ones(2), "runt_size": 0,
         "input_ids": model.tokenizer(["a red circle"] * 2, padding="max_length", return_tensors="pt").input_ids}
after_each_step = []
for step in range(3):  # one grad_accum window of 3
    training_step(model, model.noise_scheduler("ddpm"), batch, StepSettings.from_args(args), accelerator,
                  optimizers, window=3, update=step == 2, clip_grad_norm=None)
    after_each_step.append(len(exchanges))
if accelerator.is_main_process:
    print("EXCHANGES", json.dumps(after_each_step))
"""


def test_processes_exchange_gradients_once_per_optimizer_update(tmp_path):
    """The window's earlier steps run under no_sync: DDP's communication hook runs only in the last one."""
    script = tmp_path / "no_sync.py"
    script.write_text(NO_SYNC_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                             str(REPO), str(TINY_MODEL), str(REPO / "demo" / "data"),
                             str(REPO / "cfgs" / "tiny_optimizer.json")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (counts,) = re.findall(r"EXCHANGES (\[.*\])", result.stdout)
    first, second, third = json.loads(counts)
    assert first == second == 0 and third > 0  # UNet and text encoder buckets, once

# Per process batch 2 on 2 processes = global batch 4, in grad_accum windows of 2. Every source of randomness is
# on (flips, caption dropout and tag shuffling, offset and pyramid noise, embedding perturbation), with EMA,
# validation, samples and resumable epoch saves.
RUN_ARGS = ["--resolution", "64", "--grad_accum", "2", "--max_epochs", "2", "--log_step", "1", "--seed", "5",
            "--flip_p", "0.5", "--cond_dropout", "0.2", "--shuffle_tags", "--zero_frequency_noise_ratio", "0.1",
            "--pyramid_noise_discount", "0.3", "--embedding_perturbation", "0.1", "--ema_decay_rate", "0.9",
            "--ema_update_interval", "1", "--sample_steps", "4", "--save_every_n_epochs", "1", "--save_optimizer",
            "--write_schedule", "--no_save_ckpt"]


def torchrun(args: list[str]) -> subprocess.Popen:
    """train.py on two CPU processes, launched as a user would: `torchrun --nproc_per_node 2 train.py ...`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(REPO / "train.py"), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same training as one process with batch 4 and as two processes with batch 2 each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("multi")
    images = root / "images"
    images.mkdir()
    for i in range(14):  # 10 square and 4 wide images, each a different colour gradient, captions with tags
        size = (64, 64) if i < 10 else (96, 64)
        gradient = torch.linspace(0, 1, size[0]).expand(size[1], size[0])
        pixels = torch.stack([gradient * 25 * i % 255, 255 - gradient * 200, torch.full_like(gradient, 18 * i)], -1)
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(images / f"img_{i:02d}.png")
        (images / f"img_{i:02d}.txt").write_text(f"shape {i}, colour {i % 3}, light, plain")
    prompts = root / "prompts.txt"
    prompts.write_text("shape 3, colour 0\n")
    # An Adam whose epsilon dwarfs the gradients' scale steps in proportion to the gradient, so that the float
    # rounding of a two-process reduction stays as small in the weights as it is in the gradients.
    optimizer = write_json(root / "optimizer.json", {"base": {"optimizer": "adamw", "lr": 0.05, "epsilon": 1.0,
                                                              "weight_decay": 0.0}})
    validation = write_json(root / "validation.json", {"val_split_mode": "automatic", "auto_split_proportion": 0.2,
                                                        "every_n_epochs": 1, "seed": 3, "batch_size": 2})
    common = ["--resume_ckpt", str(TINY_MODEL), "--data_root", str(images), "--optimizer_config", str(optimizer),
              "--validation_config", str(validation), "--sample_prompts", str(prompts), *RUN_ARGS]
    import train

    two_processes = torchrun([*common, "--batch_size", "2", "--logdir", str(root / "two"), "--wandb"])
    assert train.main([*common, "--batch_size", "4", "--logdir", str(root / "one")]) == 0  # meanwhile
    output = finish(two_processes)
    (one,), (two,) = (root / "one").iterdir(), (root / "two").iterdir()
    return dict(root=root, common=common, one=one, two=two, output=output)


def trained_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"unet.{k}": v for k, v in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items()} | \
        {f"te.{k}": v for k, v in load_file(folder / "text_encoder" / "model.safetensors").items()}


def final(run: Path, suffix: str = "") -> Path:
    (folder,) = run.glob(f"ckpts/last-*{suffix}")
    return folder


def test_two_processes_of_batch_b_train_the_weights_of_one_process_of_batch_2b(two_runs):
    start = trained_weights(TINY_MODEL)
    for suffix in ("[0-9]", "_ema"):  # the live model and its EMA
        one, two = trained_weights(final(two_runs["one"], suffix)), trained_weights(final(two_runs["two"], suffix))
        assert one.keys() == two.keys() == start.keys()
        moved = max((one[k] - start[k]).abs().max().item() for k in one)
        apart = max((one[k] - two[k]).abs().max().item() for k in one)
        assert moved > 1e-3 and apart < 1e-5, (moved, apart)  # float reduction order only
    scalars_one, scalars_two = read_scalars(two_runs["one"]), read_scalars(two_runs["two"])
    for tag in ("loss/log_step", "loss/epoch", "loss/val", "hyperparameter/lr unet"):
        (steps_one, values_one), (steps_two, values_two) = zip(*scalars_one[tag]), zip(*scalars_two[tag])
        assert steps_one == steps_two and len(steps_one) > 1, tag
        np.testing.assert_allclose(values_two, values_one, rtol=1e-4, err_msg=tag)


def test_the_first_process_alone_writes_the_run_folder_logs_samples_and_checkpoints(two_runs):
    run, output = two_runs["two"], two_runs["output"]
    assert [p.name for p in run.parent.iterdir()] == [run.name]  # one run folder
    assert len(list(run.glob("events.out.tfevents.*"))) == 1 and len(list(run.glob("*.log"))) == 1
    # Weights & Biases (on in this run only): one W&B run, with the first process's TensorBoard scalars.
    assert len(list(run.glob("wandb/offline-run-*"))) == 1
    tb_losses = dict(read_scalars(run)["loss/log_step"])
    assert wandb_scalars(read_wandb(run), "loss/log_step") == pytest.approx(tb_losses) and len(tb_losses) > 1
    log_text = (run / f"{run.name}.log").read_text()
    assert "batch 2 x grad_accum 2 x 2 process(es) = 8 images per update" in log_text  # the effective batch
    assert output.count("Training: 2 epochs") == 1  # the other process prints errors only
    # Samples: the one-process run's, once each.
    assert sorted(p.name for p in (run / "samples").iterdir()) == \
        sorted(p.name for p in (two_runs["one"] / "samples").iterdir()) != []
    # Checkpoints: the one-process run's, each written once and complete.
    saved = re.findall(r"Saved diffusers model: (\S+)", log_text)
    assert len(saved) == len(set(saved)) and not list(run.rglob("*.partial"))
    assert sorted(Path(folder).name for folder in saved) == sorted(p.name for p in (run / "ckpts").iterdir()) == \
        sorted(p.name for p in (two_runs["one"] / "ckpts").iterdir())


def at_window_end(global_step: int, run: Path) -> bool:
    """Whether a step ends a grad_accum window of 2 (windows restart with every epoch)."""
    per_epoch = len({line.split(",")[0] for line in (run / "ep0_batch_schedule.txt").read_text().splitlines()})
    in_epoch = (global_step - 1) % per_epoch + 1
    return in_epoch % 2 == 0 or in_epoch == per_epoch


def test_the_schedule_is_the_one_process_schedule_and_trains_each_image_once_per_epoch(two_runs):
    held_out = 3  # ceil(0.2 x 14) images of validation
    for epoch in range(2):
        lines = (two_runs["two"] / f"ep{epoch}_batch_schedule.txt").read_text().splitlines()
        assert lines == (two_runs["one"] / f"ep{epoch}_batch_schedule.txt").read_text().splitlines()
        slots: dict[str, list] = {}
        for line in lines:
            step, runt, path = re.match(r"step:(\d+), wh:\[\d+, \d+\], r:(\d+), path:(.+?), batch_id", line).groups()
            slots.setdefault(step, []).append((int(runt), path))
        real = Counter(path for batch in slots.values() for slot, (runt, path) in enumerate(batch)
                       if not runt or slot < runt)
        assert len(real) == 14 - held_out and set(real.values()) == {1}
        assert all(len(batch) == 4 for batch in slots.values())  # whole global batches, 2 per process


def test_an_interrupted_two_process_run_resumes_to_the_same_weights(two_runs, tmp_path, capsys):
    """Ctrl-C to torchrun reaches both processes; they stop together at the end of a grad_accum window and the
    first saves a resumable checkpoint. Resumed on two processes it ends on the uninterrupted run's weights bit for
    bit; one process is refused, before training, with what to do. Timed checkpoints, too, are taken at the ends
    of windows."""
    logdir = tmp_path / "logs"
    process = torchrun([*two_runs["common"], "--batch_size", "2", "--logdir", str(logdir), "--ckpt_every_n_minutes",
                        "1e-9"])
    deadline = time.monotonic() + 300
    while not list(logdir.glob("*/ckpts/myproj-ep00-gs00002")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-4000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=300)[0]
    assert "SIGINT received: stopping after this step" in output
    (interrupted,) = (p for p in logdir.glob("*/ckpts/interrupted-gs*") if not p.name.endswith("_ema"))
    steps = [int(p.name.split("gs")[1]) for p in interrupted.parent.glob("*-gs*[0-9]")]
    assert len(steps) >= 2 and all(at_window_end(step, two_runs["two"]) for step in steps)

    import train

    alone = train.main([*two_runs["common"], "--batch_size", "2", "--resume_ckpt", str(interrupted),
                        "--logdir", str(tmp_path / "alone")])
    assert alone == 2 and not (tmp_path / "alone").exists()
    assert f"{interrupted} continues a run trained with 2 processes; this run has 1." in capsys.readouterr().out

    output = finish(torchrun([*two_runs["common"], "--batch_size", "2", "--resume_ckpt", str(interrupted),
                              "--logdir", str(logdir)]))
    assert f"Resuming the run of {interrupted}" in output
    resumed = max(logdir.iterdir(), key=lambda p: p.stat().st_mtime)
    for suffix in ("[0-9]", "_ema"):
        expected, got = trained_weights(final(two_runs["two"], suffix)), trained_weights(final(resumed, suffix))
        assert all(torch.equal(expected[k], got[k]) for k in expected)
