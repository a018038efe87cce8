"""Rectified flow and reflow (issue #6) on the tiny model.

A tiny v-prediction model is made inside the tests (the demo model with a v-prediction scheduler, trained
briefly as one), then fine-tuned with rectified flow; reflow then runs on that flow model.
"""
from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.conftest import REPO, TINY_MODEL, write_json
from tests.conftest import read_scalars
from utils.objective import flow

RESOLUTION = 64
CAPTION = "a square"


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> Path:
    """Eight flat red or blue squares under one caption: a two-mode image distribution for one prompt, which a
    first rectified flow can only reach along curved paths (it averages the two at first)."""
    root = tmp_path_factory.mktemp("squares")
    for i in range(8):
        Image.new("RGB", (RESOLUTION, RESOLUTION), (220, 30, 30) if i % 2 else (30, 30, 220)).save(root / f"sq_{i}.png")
        (root / f"sq_{i}.txt").write_text(CAPTION)
    return root


def train_run(logdir: Path, data_root: Path, model: Path, *extra: str) -> Path:
    """A run of train.main on 64 px squares, batch 4, constant LR; returns its run folder."""
    import train

    status = train.main(["--resume_ckpt", str(model), "--data_root", str(data_root), "--resolution", str(RESOLUTION),
                         "--batch_size", "4", "--optimizer_config", str(REPO / "cfgs" / "demo_optimizer.json"),
                         "--lr_scheduler", "constant", "--cond_dropout", "0", "--disable_textenc_training",
                         "--sample_steps", "0", "--log_step", "1", "--logdir", str(logdir), *extra])
    assert status == 0
    (run,) = logdir.iterdir()
    return run


def last_checkpoint(run: Path) -> Path:
    (folder,) = (p for p in (run / "ckpts").iterdir() if p.name.startswith("last-") and p.is_dir())
    return folder


@pytest.fixture(scope="module")
def v_model(tmp_path_factory, squares) -> Path:
    """The demo model as a v-prediction model, trained as one for 20 steps."""
    base = tmp_path_factory.mktemp("v_base") / "tiny-v"
    shutil.copytree(TINY_MODEL, base)
    scheduler_file = base / "scheduler" / "scheduler_config.json"
    write_json(scheduler_file, json.loads(scheduler_file.read_text()) | {"prediction_type": "v_prediction"})
    run = train_run(tmp_path_factory.mktemp("v_logs"), squares, base, "--max_epochs", "10", "--no_save_ckpt")
    return last_checkpoint(run)


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, squares, v_model) -> Path:
    """The v-model fine-tuned with rectified flow for 40 steps, saved as a folder and a single file."""
    return train_run(tmp_path_factory.mktemp("flow_logs"), squares, v_model, "--rectified_flow", "--max_epochs", "20",
                     "--save_full_precision")


def tiny_batch(model, n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, token ids) of n random 64 px images captioned CAPTION."""
    from utils.objective.step import encode_images

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1
    ids = model.tokenizer([CAPTION] * n, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    return encode_images(model.vae, pixels, generator), ids


# ---------------------------------------------------------------- conventions and formulas

def test_on_a_straight_path_the_flow_sampler_with_our_target_stays_on_it():
    """x_sigma = (1 - sigma) x + sigma n with target n - x: diffusers' flow scheduler, given that target, steps from
    one point of the path exactly to the next and ends on the clean latent, calling the UNet at timestep
    floor(1000 sigma), the timestep we train noise level sigma at."""
    from diffusers import DDIMScheduler

    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    for steps in (1, 4, 7):
        scheduler = flow.flow_scheduler(DDIMScheduler(prediction_type="v_prediction").config)
        scheduler.set_timesteps(steps)
        sigmas = scheduler.sigmas.double()
        x = (1 - sigmas[0]) * clean + sigmas[0] * noise
        for index, t in enumerate(scheduler.timesteps):
            path_point, target = flow.training_pair(clean, noise, torch.full((2,), int(t)), 1000)
            assert int(t) == int(sigmas[index] * 1000)
            assert torch.allclose(path_point, (1 - int(t) / 1000) * clean + int(t) / 1000 * noise, atol=1e-6)
            assert torch.equal(target, noise - clean)
            x = scheduler.step(target, t, x.float()).prev_sample
            assert torch.allclose(x, (1 - sigmas[index + 1]) * clean + sigmas[index + 1] * noise, atol=1e-5)
        assert torch.allclose(x, clean, atol=1e-5)


def test_compute_loss_trains_the_velocity_at_noise_level_t_over_1000_with_flow_min_snr():
    """compute_loss with rectified_flow against the formulas: UNet input (1 - s) x + s n at timestep t = 1000 s,
    target n - x, MSE weighted by min-SNR-5 for the path, SNR = ((1 - s) / s)^2 times s^2."""
    from utils.model import models
    from utils.objective.step import StepSettings, compute_loss, encode_text

    model = models.load(TINY_MODEL)
    latents, ids = tiny_batch(model)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    batch = {"latents": latents, "noise": noise, "input_ids": ids, "runt_size": 0, "loss_scale": torch.ones(2)}
    settings = StepSettings(loss_type="mse", zero_frequency_noise_ratio=0.5, timestep_start=0, timestep_end=1000,
                            batch_size=2, pyramid_noise_discount=None, embedding_perturbation=0.0, min_snr_gamma=5.0,
                            clip_skip=0, rectified_flow=True)
    torch.manual_seed(7)
    with torch.no_grad():
        loss = compute_loss(model.unet, model.text_encoder, model.vae, model.noise_scheduler("ddpm"), batch, settings)
    torch.manual_seed(7)
    t = torch.randint(0, 1000, (2,))
    s = (t.double() / 1000).view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = model.unet(((1 - s) * latents + s * noise).float(), t, encode_text(model.text_encoder, ids)).sample
    snr = ((1 - s) / s) ** 2
    weight = (s ** 2 * torch.minimum(snr, torch.tensor(5.0))).flatten()
    expected = (((pred - (noise - latents)) ** 2).mean(dim=(1, 2, 3)) * weight).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_sampler_takes_euler_steps_over_the_noise_level_and_straightness_is_liu_s():
    """flow.sample == x <- x + (s_next - s) * unet(x, floor(1000 s)) from s = 0.999 down to 0 in equal steps; the
    straightness of that path is the step-weighted mean of |v_k - (x_start - x_end) / (s_start - s_end)|^2."""
    from utils.model import models
    from utils.objective.step import encode_text

    model = models.load(TINY_MODEL)
    _, ids = tiny_batch(model)
    with torch.no_grad():
        embeds = encode_text(model.text_encoder, ids)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    velocities = []
    sampled, sigmas = flow.sample(model.unet, embeds, noise, 5, model.scheduler.config, velocities)

    levels = [0.999 * (5 - k) / 5 for k in range(6)]
    assert sigmas.tolist() == pytest.approx(levels, abs=1e-6)
    x, euler_velocities = noise.clone(), []
    with torch.no_grad():
        for s, s_next in zip(levels, levels[1:]):
            v = model.unet(x, torch.tensor(int(s * 1000)), embeds).sample
            euler_velocities.append(v)
            x = x + (s_next - s) * v
    assert torch.allclose(sampled, x, atol=1e-5)

    secant = (noise - sampled) / (levels[0] - levels[-1])
    expected = np.mean([(v - secant).pow(2).mean().item() for v in euler_velocities])  # equal steps: plain mean
    assert flow.straightness(velocities, sigmas) == pytest.approx(expected, rel=1e-4)
    assert flow.straightness([velocities[0]] * 5, sigmas) == pytest.approx(0, abs=1e-12)  # straight


def test_validation_loss_is_the_flow_objective(tmp_path, squares):
    """A validation pass of a rectified-flow run, recomputed by hand: flow input and velocity target with the
    validation generator's draws (latent sample, noise, timesteps), plain MSE per image."""
    import data
    from data.images import load_training_image
    from torch.utils.tensorboard import SummaryWriter
    from utils.model import models
    from utils.objective.step import StepSettings, encode_text
    from utils.watch.validation import Validator, load_validation_config, split_records

    model = models.load(TINY_MODEL)
    val = tmp_path / "val"
    val.mkdir()
    for i, colour in enumerate(((200, 20, 20), (20, 200, 20))):
        Image.new("RGB", (RESOLUTION, RESOLUTION), colour).save(val / f"v{i}.png")
        (val / f"v{i}.txt").write_text(CAPTION)
    cfg = load_validation_config(write_json(tmp_path / "validation.json", {
        "val_split_mode": "manual", "manual_data_root": str(val), "batch_size": 2, "seed": 3}))
    _, sets = split_records(data.assign_buckets(data.scan(squares).records, RESOLUTION), cfg, RESOLUTION)
    settings = StepSettings(loss_type="mse_huber", zero_frequency_noise_ratio=0.0, timestep_start=100,
                            timestep_end=900, batch_size=2, pyramid_noise_discount=None, embedding_perturbation=0.0,
                            min_snr_gamma=5.0, clip_skip=0, rectified_flow=True)
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        losses = Validator(cfg, sets, settings).run(model.unet, model.text_encoder, model.vae,
                                                    model.noise_scheduler("ddpm"), model.tokenizer, 0, writer,
                                                    contextlib.nullcontext)

    (batch,) = data.build_epoch_batches(sets["val"], 2, 3, epoch=0)
    records = sets["val"]
    pixels = torch.stack([load_training_image(records[i].path, batch.bucket, random.Random(0), False)
                          for i in batch.indices])
    ids = model.tokenizer([CAPTION] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.sample(generator) * model.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(100, 900, (2,), generator=generator)
        s = t.view(-1, 1, 1, 1) / 1000
        pred = model.unet((1 - s) * latents + s * noise, t, encode_text(model.text_encoder, ids)).sample
    assert losses["val"] == pytest.approx(((pred - (noise - latents)) ** 2).mean().item(), rel=1e-5)


# ---------------------------------------------------------------- from a v-prediction model

def test_our_convention_starts_clearly_lower_than_the_literal_one(v_model, squares):
    """The issue's experiment: the briefly v-trained model switched to rectified flow, its loss on its training
    images at the same points of the same straight paths, under our convention (timestep = noise level, target
    noise - image) and under the specification read literally (timestep = 1000 - ours, target image - noise).
    Before v-training (the demo model as it ships) the two are about equal: the gap is what the v-model brings."""
    from data.images import load_training_image
    from utils.model import models
    from utils.objective.step import StepSettings, compute_loss, encode_images, encode_text

    pixels = torch.stack([load_training_image(str(path), (RESOLUTION, RESOLUTION), random.Random(0), False)
                          for path in sorted(squares.glob("*.png"))])
    settings = StepSettings(loss_type="mse", zero_frequency_noise_ratio=0.0, timestep_start=0, timestep_end=1000,
                            batch_size=8, pyramid_noise_discount=None, embedding_perturbation=0.0,
                            min_snr_gamma=None, clip_skip=0, rectified_flow=True)

    def first_losses(path) -> tuple[float, float]:
        model = models.load(path)
        ids = model.tokenizer([CAPTION] * 8, padding="max_length", max_length=77, return_tensors="pt").input_ids
        ours, literal = [], []
        with torch.no_grad():
            for seed in range(4):
                generator = torch.Generator().manual_seed(seed)
                latents = encode_images(model.vae, pixels, generator)
                noise = torch.randn(latents.shape, generator=generator)
                batch = {"latents": latents, "noise": noise, "input_ids": ids, "runt_size": 0,
                         "loss_scale": torch.ones(8)}
                torch.manual_seed(seed)
                ours.append(compute_loss(model.unet, model.text_encoder, model.vae, model.noise_scheduler("ddpm"),
                                         batch, settings).item())
                torch.manual_seed(seed)
                t_literal = 1 - torch.randint(0, 1000, (8,)) / 1000  # the document's t: 1 at the image
                x_t = t_literal.view(-1, 1, 1, 1) * latents + (1 - t_literal.view(-1, 1, 1, 1)) * noise
                pred = model.unet(x_t, t_literal * 1000, encode_text(model.text_encoder, ids)).sample
                literal.append((pred - (latents - noise)).pow(2).mean().item())
        return float(np.mean(ours)), float(np.mean(literal))

    ours, literal = first_losses(v_model)
    assert ours < 0.6 * literal, (ours, literal)
    untrained_ours, untrained_literal = first_losses(TINY_MODEL)
    assert untrained_ours == pytest.approx(untrained_literal, rel=0.2), (untrained_ours, untrained_literal)


def test_flow_checkpoints_sample_the_same_in_a_stock_pipeline(flow_run, tmp_path):
    """The saved folder's scheduler makes a stock StableDiffusionPipeline generate what our sampler generates (same
    seed and steps); the single file carries the same scheduler for our loader and says how to sample it; samples
    during training use the same sampler."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from torch.utils.tensorboard import SummaryWriter
    from utils.model import models
    from utils.watch.sampling import SampleEvent, SampleRequest, SampleSettings, generate_samples
    from utils.objective.step import encode_text

    folder = last_checkpoint(flow_run)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert (pipe.scheduler.config.use_flow_sigmas, pipe.scheduler.config.prediction_type,
            pipe.scheduler.config.solver_order) == (True, "flow_prediction", 1)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(CAPTION, height=RESOLUTION, width=RESOLUTION, num_inference_steps=12, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(9), output_type="latent").images

    model = models.load(folder)
    ids = model.tokenizer([CAPTION], padding="max_length", max_length=77, return_tensors="pt").input_ids
    noise = torch.randn(stock.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ours, _ = flow.sample(model.unet, encode_text(model.text_encoder, ids), noise, 12, model.scheduler.config)
    assert torch.allclose(ours, stock, atol=1e-5)

    single = folder.parent / f"{folder.name}.safetensors"
    with safe_open(single, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["prediction_type"] == "flow_prediction" and "Euler" in metadata["sampler"]
    restored = models.load(single).scheduler
    assert type(restored) is DPMSolverMultistepScheduler
    assert {k: v for k, v in restored.config.items() if not k.startswith("_")} == \
        {k: v for k, v in model.scheduler.config.items() if not k.startswith("_")}

    with SummaryWriter(str(tmp_path / "tb")) as writer:
        # The user's sampler choice (ddim) cannot sample a flow model: the flow solver is used instead.
        settings = SampleSettings(batch_size=1, seed=9, resolution=RESOLUTION, every_n_steps=1,
                                  generate_pretrain_samples=False, scheduler="ddim")
        event = SampleEvent(settings, (SampleRequest(prompt=CAPTION, seed=9, size=(RESOLUTION, RESOLUTION)),))
        (strip,) = generate_samples(model, model.unet, model.text_encoder, event, step=0, out_dir=tmp_path,
                                    tb_writer=writer, autocast=contextlib.nullcontext)
    assert "sampler: flow, 30 steps" in strip.with_suffix(".txt").read_text()
    expected = pipe(CAPTION, height=RESOLUTION, width=RESOLUTION, num_inference_steps=settings.num_inference_steps,
                    guidance_scale=settings.cfgs[0], generator=torch.Generator().manual_seed(9)).images[0]
    expected.save(tmp_path / "expected.jpg", quality=95)  # as the strip is saved
    # The first tile, away from its label (bottom right) and the next tile (JPEG blocks and chroma smoothing).
    first_tile = np.asarray(Image.open(strip), dtype=float)[:40, :56]
    assert np.abs(first_tile - np.asarray(Image.open(tmp_path / "expected.jpg"), dtype=float)[:40, :56]).max() <= 1


# ---------------------------------------------------------------- reflow

def test_reflow_straightens_the_flow_and_one_step_samples_get_closer(flow_run, squares, tmp_path):
    """One reflow iteration through train.py: phase 1 generates 16 pairs with the model's 8-step ODE, phase 2 trains
    on them; the model's paths from fixed noise are then straighter and one Euler step lands closer to the 8-step
    sample (Liu et al.'s headline effect). Both phases and the main epoch after them are in TensorBoard. As many
    steps on the images themselves (a control run) do not straighten the flow like that."""
    from utils.model import models
    from utils.objective.step import encode_text

    flow_model = last_checkpoint(flow_run)
    run = train_run(tmp_path / "reflow", squares, flow_model, "--rectified_flow", "--reflow_steps", "1",
                    "--reflow_gen_batches", "4", "--reflow_sample_steps", "8", "--reflow_train_epochs", "8",
                    "--max_epochs", "1", "--no_save_ckpt")
    scalars = read_scalars(run)
    (before_step, straight_before), (after_step, straight_after) = scalars["reflow/straightness"]
    (_, one_step_before), (_, one_step_after) = scalars["reflow/one_step_error"]
    assert (before_step, after_step) == (0, 32)  # 16 pairs, batch 4, 8 epochs
    assert straight_after < 0.7 * straight_before, (straight_before, straight_after)
    assert one_step_after < 0.7 * one_step_before, (one_step_before, one_step_after)
    assert [step for step, _ in scalars["loss/reflow_epoch"]] == list(range(4, 33, 4))
    assert [step for step, _ in scalars["loss/log_step"]] == list(range(1, 35))  # reflow's 32 steps, then 2 main
    assert [step for step, _ in scalars["loss/epoch"]] == [34]
    log = (run / f"{run.name}.log").read_text()
    assert "16 generated pairs (8-step ODE)" in log and "kept in memory" in log
    assert not (run / "reflow_pairs").exists()

    control = train_run(tmp_path / "control", squares, flow_model, "--rectified_flow", "--max_epochs", "17",
                        "--no_save_ckpt")  # 34 steps on the images, as many as the reflow run's
    straightness = {}
    for name, folder in (("reflow", last_checkpoint(run)), ("control", last_checkpoint(control))):
        model = models.load(folder)
        ids = model.tokenizer([CAPTION] * 4, padding="max_length", max_length=77, return_tensors="pt").input_ids
        noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            measures = flow.measure(model.unet.eval(), encode_text(model.text_encoder, ids), noise, 8,
                                    model.scheduler.config)
        straightness[name] = measures.straightness
    assert straightness["reflow"] < 0.5 * straightness["control"], straightness


def test_reflow_pairs_on_disk_are_the_pairs_in_memory(tmp_path):
    """Above the memory limit pairs go to safetensors files in the run folder: the same batches come back, each of
    one latent size, and the files go when discarded."""
    prompts = [flow.PromptBatch(torch.full((2, 77), i), [f"c{i}a", f"c{i}b"], (2, 4, 8, 8 + 4 * (i % 2)))
               for i in range(3)]
    assert flow.ReflowPairs.bytes_needed(prompts) == 4 * 2 * (2 * 4 * 8 * 8 + 2 * 4 * 8 * 12 + 2 * 4 * 8 * 8)
    in_memory = flow.new_pairs_store(prompts, tmp_path)
    on_disk = flow.new_pairs_store(prompts, tmp_path, memory_limit=1000)
    assert in_memory.folder is None and on_disk.folder == tmp_path / "reflow_pairs"
    generator = torch.Generator().manual_seed(0)
    for prompt in prompts:
        noise, latents = torch.randn(prompt.latent_shape, generator=generator), torch.randn(prompt.latent_shape)
        for store in (in_memory, on_disk):
            store.add(noise, latents, prompt.input_ids, prompt.captions)
    assert len(list(on_disk.folder.iterdir())) == 3 and len(on_disk) == len(in_memory) == 6

    order = in_memory.epoch(3, torch.Generator().manual_seed(1))
    assert order == on_disk.epoch(3, torch.Generator().manual_seed(1))
    assert sorted(row for rows in order for row in rows) == [(p, r) for p in range(3) for r in range(2)]
    assert all(len({part % 2 for part, _ in rows}) == 1 for rows in order)  # never two latent sizes in a batch
    for rows in order:
        memory_batch, disk_batch = in_memory.batch(rows), on_disk.batch(rows)
        for key in ("noise", "latents", "input_ids"):
            assert torch.equal(memory_batch[key], disk_batch[key])
        assert memory_batch["captions"] == disk_batch["captions"] == [f"c{p}{'ab'[r]}" for p, r in rows]
        assert torch.equal(memory_batch["input_ids"][:, 0], torch.tensor([p for p, _ in rows]))
    on_disk.discard()
    assert not on_disk.folder.exists()


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("extra, message", [
    (["--reflow_steps", "1"], "reflow_steps 1 needs rectified_flow"),
    (["--rectified_flow", "--enable_zero_terminal_snr"], "Turn one of them off"),
    (["--rectified_flow"], "rectified_flow needs a v-prediction model; "),
])
def test_unusable_combinations_stop_with_a_clear_message(tmp_path, squares, capsys, extra, message):
    import train

    status = train.main(["--resume_ckpt", str(TINY_MODEL), "--data_root", str(squares), "--resolution", "64",
                         "--logdir", str(tmp_path / "logs"), *extra])
    assert status == 2 and message in capsys.readouterr().out
    assert not (tmp_path / "logs").exists()


def test_a_flow_model_is_not_trained_as_a_diffusion_model(flow_run, squares, tmp_path, capsys):
    import train

    status = train.main(["--resume_ckpt", str(last_checkpoint(flow_run)), "--data_root", str(squares),
                         "--resolution", "64", "--logdir", str(tmp_path / "logs")])
    assert status == 2 and "Set rectified_flow: true to keep training it" in capsys.readouterr().out


def test_reflow_from_a_model_not_yet_trained_as_a_flow_is_warned_about(v_model, caplog):
    from types import SimpleNamespace

    from utils.model import models

    model = models.load(v_model)
    with caplog.at_level("WARNING"):
        flow.configure_model(model, SimpleNamespace(rectified_flow=True, reflow_steps=1))
    assert "Train with rectified_flow first, then run reflow from that checkpoint" in caplog.text
    assert model.prediction_type == "flow_prediction"
