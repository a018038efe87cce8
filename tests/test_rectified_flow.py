"""Rectified flow and reflow (issue #6) on the tiny model.

A tiny v-prediction model is made inside the tests (the demo model with a v-prediction scheduler, trained
briefly as one), then fine-tuned with rectified flow; reflow then runs on that flow model.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import SQUARE_CAPTION, SQUARE_SIZE, TINY_MODEL, write_json
from utils.objective import flow



def tiny_batch(model, n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, token ids) of n random 64 px images captioned SQUARE_CAPTION."""
    from utils.objective.step import encode_images

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, SQUARE_SIZE, SQUARE_SIZE, generator=generator) * 2 - 1
    ids = model.tokenizer([SQUARE_CAPTION] * n, padding="max_length", max_length=model.tokenizer.model_max_length,
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
        Image.new("RGB", (SQUARE_SIZE, SQUARE_SIZE), colour).save(val / f"v{i}.png")
        (val / f"v{i}.txt").write_text(SQUARE_CAPTION)
    cfg = load_validation_config(write_json(tmp_path / "validation.json", {
        "val_split_mode": "manual", "manual_data_root": str(val), "batch_size": 2, "seed": 3}))
    _, sets = split_records(data.assign_buckets(data.scan(squares).records, SQUARE_SIZE), cfg, SQUARE_SIZE)
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
    ids = model.tokenizer([SQUARE_CAPTION] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.sample(generator) * model.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(100, 900, (2,), generator=generator)
        s = t.view(-1, 1, 1, 1) / 1000
        pred = model.unet((1 - s) * latents + s * noise, t, encode_text(model.text_encoder, ids)).sample
    assert losses["val"] == pytest.approx(((pred - (noise - latents)) ** 2).mean().item(), rel=1e-5)


# ---------------------------------------------------------------- from a v-prediction model


# ---------------------------------------------------------------- reflow


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
