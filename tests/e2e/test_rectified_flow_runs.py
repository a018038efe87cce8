"""Rectified flow and reflow in real runs of train.py on the tiny model: a v-prediction model trained briefly, then
fine-tuned with rectified flow; reflow then runs on that flow model (doc/RECTIFIED_FLOW.md)."""
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

from tests.conftest import REPO, SQUARE_CAPTION, SQUARE_SIZE, TINY_MODEL, read_scalars, write_json
from utils.objective import flow


def train_run(logdir: Path, data_root: Path, model: Path, *extra: str) -> Path:
    """A run of train.main on 64 px squares, batch 4, constant LR; returns its run folder."""
    import train

    status = train.main(["--resume_ckpt", str(model), "--data_root", str(data_root), "--resolution", str(SQUARE_SIZE),
                         "--batch_size", "4", "--optimizer_config", str(REPO / "cfgs" / "tiny_optimizer.json"),
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


def test_our_convention_starts_clearly_lower_than_the_literal_one(v_model, squares):
    """The issue's experiment: the briefly v-trained model switched to rectified flow, its loss on its training
    images at the same points of the same straight paths, under our convention (timestep = noise level, target
    noise - image) and under the specification read literally (timestep = 1000 - ours, target image - noise).
    Before v-training (the demo model as it ships) the two are about equal: the gap is what the v-model brings."""
    from data.images import load_training_image
    from utils.model import models
    from utils.objective.step import StepSettings, compute_loss, encode_images, encode_text

    pixels = torch.stack([load_training_image(str(path), (SQUARE_SIZE, SQUARE_SIZE), random.Random(0), False)
                          for path in sorted(squares.glob("*.png"))])
    settings = StepSettings(loss_type="mse", zero_frequency_noise_ratio=0.0, timestep_start=0, timestep_end=1000,
                            batch_size=8, pyramid_noise_discount=None, embedding_perturbation=0.0,
                            min_snr_gamma=None, clip_skip=0, rectified_flow=True)

    def first_losses(path) -> tuple[float, float]:
        model = models.load(path)
        ids = model.tokenizer([SQUARE_CAPTION] * 8, padding="max_length", max_length=77, return_tensors="pt").input_ids
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
    stock = pipe(SQUARE_CAPTION, height=SQUARE_SIZE, width=SQUARE_SIZE, num_inference_steps=12, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(9), output_type="latent").images

    model = models.load(folder)
    ids = model.tokenizer([SQUARE_CAPTION], padding="max_length", max_length=77, return_tensors="pt").input_ids
    noise = torch.randn(stock.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ours, _ = flow.sample(model.unet, encode_text(model.text_encoder, ids), noise, 12, model.scheduler.config)
    assert torch.allclose(ours, stock, atol=1e-5)

    single = folder.parent / f"{folder.name}.safetensors"
    with safe_open(single, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["prediction_type"] == "flow_prediction" and "Euler" in metadata["sampler"]
    from_single_file = StableDiffusionPipeline.from_single_file(str(single), config=str(folder), local_files_only=True,
                                                                safety_checker=None, requires_safety_checker=False)
    assert from_single_file.scheduler.config.use_flow_sigmas  # doc/RECTIFIED_FLOW.md's way for diffusers
    restored = models.load(single).scheduler
    assert type(restored) is DPMSolverMultistepScheduler
    assert {k: v for k, v in restored.config.items() if not k.startswith("_")} == \
        {k: v for k, v in model.scheduler.config.items() if not k.startswith("_")}

    with SummaryWriter(str(tmp_path / "tb")) as writer:
        # The user's sampler choice (ddim) cannot sample a flow model: the flow solver is used instead.
        settings = SampleSettings(batch_size=1, seed=9, resolution=SQUARE_SIZE, every_n_steps=1,
                                  generate_pretrain_samples=False, scheduler="ddim")
        event = SampleEvent(settings, (SampleRequest(prompt=SQUARE_CAPTION, seed=9, size=(SQUARE_SIZE, SQUARE_SIZE)),))
        (strip,) = generate_samples(model, model.unet, model.text_encoder, event, step=0, out_dir=tmp_path,
                                    tb_writer=writer, autocast=contextlib.nullcontext)
    assert "sampler: flow, 30 steps" in strip.with_suffix(".txt").read_text()
    expected = pipe(SQUARE_CAPTION, height=SQUARE_SIZE, width=SQUARE_SIZE, num_inference_steps=settings.num_inference_steps,
                    guidance_scale=settings.cfgs[0], generator=torch.Generator().manual_seed(9)).images[0]
    expected.save(tmp_path / "expected.jpg", quality=95)  # as the strip is saved
    # The first tile, away from its label (bottom right) and the next tile (JPEG blocks and chroma smoothing).
    first_tile = np.asarray(Image.open(strip), dtype=float)[:40, :56]
    assert np.abs(first_tile - np.asarray(Image.open(tmp_path / "expected.jpg"), dtype=float)[:40, :56]).max() <= 1


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
        ids = model.tokenizer([SQUARE_CAPTION] * 4, padding="max_length", max_length=77, return_tensors="pt").input_ids
        noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            measures = flow.measure(model.unet.eval(), encode_text(model.text_encoder, ids), noise, 8,
                                    model.scheduler.config)
        straightness[name] = measures.straightness
    assert straightness["reflow"] < 0.5 * straightness["control"], straightness


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
