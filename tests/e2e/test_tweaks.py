"""Issue #5's objective tweaks on the real tiny model: clip_skip, embedding perturbation and min-SNR inside the
training step, zero terminal SNR in the training scheduler, the sampler and saved checkpoints, and one training
run with all of them on."""
from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, TINY_MODEL
from utils.model import models
from utils.objective.step import StepSettings, compute_loss, encode_text


def tiny_copy(tmp_path: Path, **scheduler_changes) -> Path:
    """The tiny model with its scheduler config changed (e.g. to v-prediction, which zero terminal SNR needs)."""
    folder = tmp_path / "tiny"
    shutil.copytree(TINY_MODEL, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | scheduler_changes))
    return folder


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1."""
    alphas_bar_sqrt = (1 - betas).cumprod(0).sqrt()
    a0, a_last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - a_last) * a0 / (a0 - a_last)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def settings(**changes) -> StepSettings:
    plain = dict(loss_type="mse", zero_frequency_noise_ratio=0.0, timestep_start=0, timestep_end=1000, batch_size=2,
                 pyramid_noise_discount=None, embedding_perturbation=0.0, min_snr_gamma=None, clip_skip=0)
    return StepSettings(**(plain | changes))


def tiny_batch(model) -> dict:
    ids = model.tokenizer(["a red square", "a blue circle"], padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return {"pixel_values": pixels, "input_ids": ids, "loss_scale": torch.tensor([1.0, 0.5]), "runt_size": 0}


def unet_conditioning(model, noise_scheduler, batch, step_settings) -> torch.Tensor:
    """The text conditioning the UNet receives during compute_loss (read with a forward hook)."""
    seen = []
    hook = model.unet.register_forward_pre_hook(lambda _, args: seen.append(args[2]))
    try:
        compute_loss(model.unet, model.text_encoder, model.vae, noise_scheduler, batch, step_settings)
    finally:
        hook.remove()
    return seen[0]


@torch.no_grad()
def test_clip_skip_takes_an_earlier_layer_through_the_final_layer_norm():
    from transformers import CLIPTextModel

    model = models.load(TINY_MODEL)
    ids = tiny_batch(model)["input_ids"]
    last = model.text_encoder(ids)[0]
    assert torch.equal(encode_text(model.text_encoder, ids, 0), last)
    assert torch.equal(encode_text(model.text_encoder, ids, 1), last)
    # clip_skip 2 is the model cut one layer short, as SD2's text encoder config does it (num_hidden_layers 23)
    config = model.text_encoder.config
    config.num_hidden_layers -= 1
    shorter = CLIPTextModel(config).eval()
    missing, unexpected = shorter.load_state_dict(model.text_encoder.state_dict(), strict=False)
    assert not missing and all(".layers.1." in key for key in unexpected)
    expected = shorter(ids)[0]
    assert not torch.allclose(expected, last)
    assert torch.allclose(encode_text(model.text_encoder, ids, 2), expected, atol=1e-5)
    # and that is what the UNet is conditioned on in the training step
    got = unet_conditioning(model, model.noise_scheduler("ddpm"), tiny_batch(model), settings(clip_skip=2))
    assert torch.allclose(got, expected, atol=1e-5)


@torch.no_grad()
def test_embedding_perturbation_reaches_the_unet_with_std_gamma_over_sqrt_width():
    model = models.load(TINY_MODEL)
    batch = tiny_batch(model)
    clean = encode_text(model.text_encoder, batch["input_ids"])
    torch.manual_seed(0)
    delta = unet_conditioning(model, model.noise_scheduler("ddpm"), batch, settings(embedding_perturbation=3.0)) - clean
    width = clean.shape[-1]
    assert abs(delta.std().item() / (3.0 / math.sqrt(width)) - 1) < 0.05  # 4928 values: std known to ~1%
    assert abs(delta.mean().item()) < 0.05 * 3.0 / math.sqrt(width)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@torch.no_grad()
def test_min_snr_gamma_scales_the_step_loss_by_the_snr_weight(prediction_type):
    model = models.load(TINY_MODEL)
    noise_scheduler = type(model.noise_scheduler("ddpm")).from_config(model.scheduler.config,
                                                                     prediction_type=prediction_type)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    batch = tiny_batch(model)
    for t in (10, 300, 900):
        snr = (alpha_bar[t] / (1 - alpha_bar[t])).item()
        weight = min(snr, 5.0) / (snr if prediction_type == "epsilon" else snr + 1)
        losses = []
        for gamma in (None, 5.0):
            torch.manual_seed(1)  # the same latents and noise for both
            losses.append(compute_loss(model.unet, model.text_encoder, model.vae, noise_scheduler, batch,
                                       settings(timestep_start=t, timestep_end=t + 1, min_snr_gamma=gamma)).item())
        assert losses[1] == pytest.approx(weight * losses[0], rel=1e-4), t


def test_zero_terminal_snr_betas_follow_algorithm_1_in_training_sampling_and_saved_models(tmp_path):
    from diffusers import DDIMScheduler

    model = models.load(tiny_copy(tmp_path, prediction_type="v_prediction"))
    model.use_zero_terminal_snr()
    sd_betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    expected = zero_terminal_snr_betas(sd_betas)
    expected_alpha_bar = torch.cumprod(1 - expected, 0)
    assert expected[-1] == 1 and expected_alpha_bar[-1] == 0  # zero SNR at t=999

    def assert_rescaled(scheduler):
        # diffusers works in float32, where 1 - alpha_bar_t / alpha_bar_t-1 keeps ~4 digits of the betas
        assert torch.allclose(scheduler.betas.double(), expected, rtol=1e-3, atol=0)
        assert torch.allclose(scheduler.alphas_cumprod.double(), expected_alpha_bar, atol=1e-6)
        assert scheduler.alphas_cumprod[-1] == 0

    for sampler in ("ddpm", "ddim"):
        assert_rescaled(model.noise_scheduler(sampler))
    # the sampler in utils/watch/sampling.py is DDIM from the model's config: same betas, sampling from t=999
    sampler = DDIMScheduler.from_config(model.scheduler.config)
    assert_rescaled(sampler)
    sampler.set_timesteps(30)
    assert sampler.timesteps[0] == 999
    # saved with the model, so the checkpoint samples the same way in diffusers
    models.save_diffusers(model, model.unet, model.text_encoder, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["rescale_betas_zero_snr"] is True and saved["timestep_spacing"] == "trailing"
    assert_rescaled(models.load(tmp_path / "saved").noise_scheduler("ddpm"))


def test_zero_terminal_snr_refuses_epsilon_models_and_the_pndm_train_sampler(tmp_path):
    with pytest.raises(models.ModelLoadError, match="enable_zero_terminal_snr needs a v-prediction model"):
        models.load(TINY_MODEL).use_zero_terminal_snr()
    model = models.load(tiny_copy(tmp_path, prediction_type="v_prediction", _class_name="PNDMScheduler"))
    model.use_zero_terminal_snr()
    assert type(model.scheduler).__name__ == "DDIMScheduler"  # PNDM cannot rescale its betas
    with pytest.raises(models.ModelLoadError, match="train_sampler 'pndm' cannot use zero-terminal-SNR betas"):
        model.noise_scheduler("pndm")


def blocks(image: np.ndarray) -> np.ndarray:
    """Means of 4x4 pixel blocks: what survives JPEG compression."""
    h, w, c = image.shape
    return image.reshape(h // 4, 4, w // 4, 4, c).mean(axis=(1, 3))


@torch.no_grad()
def test_zero_terminal_snr_samples_use_guidance_rescale_0_7(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from torch.utils.tensorboard import SummaryWriter

    from utils.watch.sampling import SampleEvent, SampleRequest, SampleSettings, generate_samples

    model = models.load(tiny_copy(tmp_path, prediction_type="v_prediction"))
    model.use_zero_terminal_snr()
    # The random tiny UNet barely depends on its prompt; larger cross-attention values make guidance, and so its
    # rescaling, visible in the images.
    for name, parameter in model.unet.named_parameters():
        if "attn2.to_v" in name:
            parameter.mul_(30)
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        event = SampleEvent(SampleSettings(batch_size=1, seed=3, resolution=64, every_n_steps=1,
                                           generate_pretrain_samples=False),
                            (SampleRequest(prompt="a red square", seed=3, size=(64, 64)),))
        (jpeg,) = generate_samples(model, model.unet, model.text_encoder, event, step=0, out_dir=tmp_path / "samples",
                                   tb_writer=writer, autocast=contextlib.nullcontext)
    tile = blocks(np.asarray(Image.open(jpeg).convert("RGB"), dtype=np.float32)[:40, :64])  # cfg 7, above its label
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=DDIMScheduler.from_config(model.scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def render(guidance_rescale):
        image = pipe(["a red square"], height=64, width=64, num_inference_steps=30, guidance_scale=7.0,
                     guidance_rescale=guidance_rescale, generator=[torch.Generator().manual_seed(3)]).images[0]
        return blocks(np.asarray(image, dtype=np.float32)[:40])

    rescaled, plain = render(0.7), render(0.0)
    assert np.isfinite(tile).all() and tile.std() > 1
    assert np.abs(rescaled - plain).mean() > 6  # the setting matters for this model ...
    assert np.abs(tile - rescaled).mean() < 0.2 * np.abs(tile - plain).mean()  # ... and the samples use it



def write_images(root: Path) -> Path:
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (220, 30, 30) if i % 2 else (30, 30, 220)).save(root / f"img_{i}.png")
        (root / f"img_{i}.txt").write_text("a red square" if i % 2 else "a blue square")
    return root


def run_train(tmp_path: Path, model: Path, *extra: str) -> int:
    import train

    return train.main(["--resume_ckpt", str(model), "--data_root", str(tmp_path / "images"), "--resolution", "128",
                       "--batch_size", "2", "--max_epochs", "1", "--optimizer_config",
                       str(REPO / "cfgs" / "tiny_optimizer.json"), "--sample_steps", "0", "--log_step", "1",
                       "--logdir", str(tmp_path / "logs"), "--save_ckpt_dir", str(tmp_path / "single"), *extra])


def test_training_with_every_tweak_on_saves_a_zero_terminal_snr_model(tmp_path):
    """Every tweak of issue #5 at once: objective, noise, schedule, optimizer, freezing, EMA, live settings."""
    from safetensors import safe_open

    from tests.conftest import write_json
    from tests.conftest import read_scalars

    write_images(tmp_path / "images")
    optimizer_file = write_json(tmp_path / "optimizer.json", {
        "base": {"optimizer": "prodigy", "lr": 1.0, "lr_scheduler": "cosine", "weight_decay": 0.01},
        "text_encoder_lr_scale": 0.5, "text_encoder_freezing": {"unfreeze_last_n_layers": 1}})
    config_file = write_json(tmp_path / "train.json", {"load_settings_every_epoch": True, "min_snr_gamma": 5})
    status = run_train(tmp_path, tiny_copy(tmp_path, prediction_type="v_prediction"),
                       "--config", str(config_file), "--optimizer_config", str(optimizer_file), "--max_epochs", "2",
                       "--enable_zero_terminal_snr", "--pyramid_noise_discount", "0.6",
                       "--zero_frequency_noise_ratio", "0.05", "--embedding_perturbation", "1.0", "--clip_skip", "2",
                       "--loss_type", "huber_mse", "--timestep_start", "100", "--timestep_end", "900",
                       "--cond_dropout", "0.1", "--scale_lr", "--lr_warmup_steps", "1", "--lr_decay_steps", "4",
                       "--attn_type", "slice", "--gradient_checkpointing", "--grad_accum", "2",
                       "--ema_strength_target", "0.1", "--ema_update_interval", "1", "--save_every_n_epochs", "1")
    assert status == 0
    (run,) = (tmp_path / "logs").iterdir()
    scalars = read_scalars(run)
    losses = [v for _, v in scalars["loss/log_step"]]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    te_lrs, unet_lrs = (dict(scalars[f"hyperparameter/lr {name}"]) for name in ("text encoder", "unet"))
    assert all(te_lrs[step] == pytest.approx(unet_lrs[step] * 0.5) for step in unet_lrs)
    assert {p.name for p in (run / "ckpts").iterdir()} >= {"myproj-ep01-gs00002", "myproj-ep01-gs00002_ema",
                                                            "last-myproj-ep02-gs00004", "last-myproj-ep02-gs00004_ema"}
    (folder,) = (run / "ckpts").glob("last-*[0-9]")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["rescale_betas_zero_snr"] is True and config["timestep_spacing"] == "trailing"
    with safe_open(tmp_path / "single" / f"{folder.name}.safetensors", framework="pt") as f:
        saved = json.loads(f.metadata()[models.CONFIG_METADATA_KEY])["scheduler"]
    assert saved["rescale_betas_zero_snr"] is True
    assert models.load(folder).noise_scheduler("ddpm").alphas_cumprod[-1] == 0  # resuming keeps the schedule


@pytest.mark.parametrize("flags, message", [
    (["--enable_zero_terminal_snr"], "enable_zero_terminal_snr needs a v-prediction model"),
    (["--clip_skip", "3"], "clip_skip 3 reaches past the text encoder's 2 layers"),
])
def test_tweaks_the_model_cannot_take_stop_before_the_run_folder(tmp_path, capsys, flags, message):
    write_images(tmp_path / "images")
    assert run_train(tmp_path, TINY_MODEL, *flags) == 2
    assert message in capsys.readouterr().out
    assert not (tmp_path / "logs").exists()
