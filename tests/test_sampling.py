"""Samples during training (doc/SAMPLES.md): the sample file and the samplers on the tiny model (whole runs are in
tests/e2e/test_sampling_runs.py)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from tests.conftest import REPO, TINY_MODEL, tensorboard_images, write_json
from utils.options import config
from utils.watch import sampling
from utils.options.config import ConfigError
from utils.watch.sampling import SAMPLERS, SampleEvent, SampleRequest, SampleSchedule, SampleSettings

DEFAULTS = SampleSettings(batch_size=2, seed=555, resolution=64, every_n_steps=10, generate_pretrain_samples=True)


def test_unknown_scheduler_stops_the_run_before_the_model_loads(tmp_path, small_dataset, capsys):
    import train

    sample_file = write_json(tmp_path / "samples.json", {"scheduler": "dpm++2m", "samples": [{"prompt": "x"}]})
    not_a_model = tmp_path / "model"  # loading it would fail with a different message
    not_a_model.mkdir()
    status = train.main(["--resume_ckpt", str(not_a_model), "--data_root", str(small_dataset), "--sample_prompts",
                         str(sample_file), "--logdir", str(tmp_path / "logs")])
    out = capsys.readouterr()
    assert status == 2
    assert f"{sample_file}: key 'scheduler' is 'dpm++2m'" in out.out + out.err
    assert "Did you mean 'dpm++_2m'?" in out.out + out.err
    assert not (tmp_path / "logs").exists()


# ---------------------------------------------------------------- rendering on the tiny model

@pytest.fixture(scope="module")
def tiny():
    from utils.model import models

    return models.load(TINY_MODEL)


def render(tiny, out_dir: Path, settings: SampleSettings, requests: list[SampleRequest], label: str = "",
           step: int = 5) -> list[Path]:
    import contextlib

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out_dir))
    try:
        return sampling.generate_samples(tiny, tiny.unet, tiny.text_encoder, SampleEvent(settings, tuple(requests)),
                                         step=step, out_dir=out_dir / "samples", tb_writer=writer,
                                         autocast=contextlib.nullcontext, label=label)
    finally:
        writer.close()


# name -> (diffusers class, options it must carry): written out here, apart from the code's table
EXPECTED_SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "ddpm": ("DDPMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "kdpm2": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpm++_2m_k": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++_2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpm++_2s_k": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++_sde": ("DPMSolverSDEScheduler", {"use_karras_sigmas": False}),
    "dpm++_sde_k": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "dpm++_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False}),
    "dpm++_2m_sde_k": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                       "use_karras_sigmas": True}),
    "flow": ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                             "solver_order": 1}),
}


def test_every_documented_sampler_name_is_offered():
    assert set(SAMPLERS) == set(EXPECTED_SAMPLERS)


@pytest.mark.parametrize("name", list(EXPECTED_SAMPLERS))
def test_each_sampler_renders_a_finite_repeatable_image_on_the_tiny_model(tiny, tmp_path, name):
    scheduler_class, options = EXPECTED_SAMPLERS[name]
    sampler = sampling.make_sampler(name, tiny.scheduler.config)
    assert type(sampler).__name__ == scheduler_class
    assert {key: sampler.config[key] for key in options} == options
    assert sampler.config.num_train_timesteps == tiny.scheduler.config.num_train_timesteps
    if "prediction_type" not in options:  # the model's betas and prediction carry over
        assert sampler.config.prediction_type == tiny.scheduler.config.prediction_type
        assert sampler.config.beta_end == tiny.scheduler.config.beta_end

    settings = SampleSettings(batch_size=1, seed=1, resolution=64, every_n_steps=1, generate_pretrain_samples=False,
                              cfgs=(4.0,), scheduler=name, num_inference_steps=2)
    request = SampleRequest("a red circle", seed=1, size=(64, 64))
    (jpg,) = render(tiny, tmp_path / "first", settings, [request])
    pixels = np.asarray(Image.open(jpg)).astype(float)
    assert pixels.shape == (64, 64, 3) and pixels.std() > 5  # a picture, not a blank or NaN-black tile
    (again,) = render(tiny, tmp_path / "again", settings, [request])
    assert again.read_bytes() == jpg.read_bytes()


def test_sampling_uses_the_live_modules_and_restores_their_modes(tiny, tmp_path):
    calls = []
    hook = tiny.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    tiny.unet.train()
    tiny.text_encoder.eval()
    settings = SampleSettings(batch_size=2, seed=1, resolution=64, every_n_steps=1, generate_pretrain_samples=False,
                              cfgs=(3.0, 1.0), scheduler="ddim", num_inference_steps=2)
    requests = [SampleRequest("a red circle", seed=9, size=(64, 64)),
                SampleRequest("a blue square", seed=9, size=(64, 64), negative_prompt="red"),
                SampleRequest("a green triangle", seed=4, size=(64, 128), random_caption=True)]
    try:
        written = render(tiny, tmp_path, settings, requests, label="ema", step=12)
    finally:
        hook.remove()
    assert tiny.unet.training and not tiny.text_encoder.training
    # Same-size requests share a batch, doubled for guidance at cfg 3 and not at cfg 1: 2 steps per call.
    assert calls == [4, 4, 2, 2, 2, 2, 1, 1]
    assert [p.name for p in written] == ["gs00012-000_ema-a red circle-s9.jpg", "gs00012-001_ema-a blue square-s9.jpg",
                                         "gs00012-002_ema-a green triangle-s4.jpg"]
    assert set(tensorboard_images(tmp_path)) == {"sample_000_ema_a red circle", "sample_001_ema_a blue square",
                                                 "sample_002_ema"}
    red, blue = (np.asarray(Image.open(p)).astype(int) for p in written[:2])
    assert np.abs(red - blue).max() > 10  # each request renders its own prompt


def test_a_sample_with_its_own_cfgs_gets_a_strip_of_those_and_its_own_batches(tiny, tmp_path):
    calls = []
    hook = tiny.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    settings = SampleSettings(batch_size=3, seed=1, resolution=64, every_n_steps=1, generate_pretrain_samples=False,
                              cfgs=(7.0, 4.0), scheduler="ddim", num_inference_steps=1)
    requests = [SampleRequest("a red circle", seed=2, size=(64, 64)),
                SampleRequest("a blue square", seed=2, size=(64, 64), cfgs=(1.0, 11.0, 3.0)),
                SampleRequest("a green triangle", seed=2, size=(64, 64))]
    try:
        written = render(tiny, tmp_path, settings, requests)
    finally:
        hook.remove()
    # The two samples at the file's cfgs share a batch (doubled for guidance at 7 and 4); the third is rendered
    # alone at its own: without guidance at 1, with it at 11 and 3.
    assert calls == [4, 4, 1, 2, 2]
    assert [Image.open(p).size for p in written] == [(2 * 64, 64), (3 * 64, 64), (2 * 64, 64)]
    texts = [p.with_suffix(".txt").read_text() for p in written]
    assert "cfgs: 7, 4\n" in texts[0] and "cfgs: 1, 11, 3\n" in texts[1] and "cfgs: 7, 4\n" in texts[2]
    own = np.asarray(Image.open(written[1])).astype(int)
    assert np.abs(own[:40, :40] - own[:40, 64:104]).max() > 10  # cfg 1 and cfg 11 give different pictures


def test_zero_terminal_snr_models_get_samplers_that_follow_the_schedule(tiny):
    zero_snr = {**tiny.scheduler.config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    assert sampling.make_sampler("euler", zero_snr).config.rescale_betas_zero_snr is True
    with pytest.raises(ConfigError, match="scheduler 'pndm' .* cannot sample a zero-terminal-SNR model"):
        sampling.make_sampler("pndm", zero_snr)


# ---------------------------------------------------------------- the sample file

def test_the_shipped_example_uses_every_key_and_loads():
    path = REPO / "cfgs" / "sample_prompts.json"
    raw = json.loads(path.read_text())
    assert set(raw) == set(sampling.SETTINGS_KEYS)
    assert set().union(*raw["samples"]) == set(sampling.REQUEST_KEYS)
    settings = sampling.read_sample_settings(path, DEFAULTS)
    assert settings.scheduler == raw["scheduler"] and len(settings.requests) == len(raw["samples"])


def test_everydream2s_shipped_sample_files_load_with_a_samples_own_cfgs():
    ed2 = REPO / "tests" / "fixtures" / "everydream2"
    settings = sampling.read_sample_settings(ed2 / "sample_prompts.json", DEFAULTS)
    assert (settings.batch_size, settings.seed, settings.cfgs, settings.scheduler, settings.num_inference_steps,
            settings.show_progress_bars) == (3, 555, (7.0, 4.0), "dpm++", 15, True)
    assert [(r.seed, r.size, r.random_caption, r.cfgs) for r in settings.requests] == [
        (555, (64, 64), False, None), (-1, (64, 64), False, None), (555, (640, 384), True, (1.0, 11.0))]
    assert settings.requests[0].negative_prompt == "distorted, deformed"
    assert sampling.read_sample_settings(ed2 / "sample_prompts.txt", DEFAULTS).requests == ()  # empty: random captions


def test_the_user_page_documents_every_key_and_sampler():
    page = (REPO / "doc" / "SAMPLES.md").read_text()
    for name in (*sampling.SETTINGS_KEYS, *sampling.REQUEST_KEYS, *SAMPLERS):
        assert f"`{name}`" in page, name


def test_txt_one_prompt_per_line_and_missing_json_keys_take_the_defaults(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("a red circle\n\n  a blue square  \n")
    settings = sampling.read_sample_settings(txt, DEFAULTS)
    assert settings.requests == (SampleRequest("a red circle", seed=555, size=(64, 64)),
                                 SampleRequest("a blue square", seed=555, size=(64, 64)))
    assert settings.cfgs == (7.0, 4.0, 1.01) and settings.scheduler == "ddim" and settings.num_inference_steps == 30

    only_seed = sampling.read_sample_settings(write_json(tmp_path / "s.json", {"seed": 3, "samples": [{}]}), DEFAULTS)
    assert only_seed == SampleSettings(batch_size=2, seed=3, resolution=64, every_n_steps=10,
                                       generate_pretrain_samples=True,
                                       requests=(SampleRequest("", seed=3, size=(64, 64)),))


def test_empty_file_samples_captions_of_the_current_batch(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("\n")
    schedule = SampleSchedule(txt, SampleSettings(batch_size=3, seed=8, resolution=64, every_n_steps=5,
                                                  generate_pretrain_samples=True))
    event = schedule.prepare(5, ["a cat", " ", "a dog"])  # " " is a dropped caption
    assert [r.prompt for r in event.requests] == ["a cat", "a dog", "a cat"]  # min(4, batch size 3), cycled
    assert all(r.random_caption and r.seed == 8 for r in event.requests)


@pytest.mark.parametrize("content, message", [
    ({"schedular": "ddim"}, "unknown key 'schedular'. Did you mean 'scheduler'?"),
    ({"cfgs": 7}, "key 'cfgs' must be a non-empty list of guidance scales"),
    ({"num_inference_steps": 0}, "key 'num_inference_steps' is 0; it must be at least 1"),
    ({"resolution": 100}, "key 'resolution' is 100; use a multiple of 64"),
    ({"show_progress_bars": "yes"}, "key 'show_progress_bars' must be true or false"),
    ({"samples": [{"prompt": "x", "size": [100, 64]}]}, "samples[0]: key 'size' must be [width, height]"),
    ({"samples": [{"promt": "x"}]}, "samples[0]: unknown key 'promt'. Did you mean 'prompt'?"),
    ({"samples": ["a cat"]}, "samples[0]: expected an object"),
    ({"samples": [{"aspect_ratio": 0}]}, "key 'aspect_ratio' must be a positive number"),
    ({"samples": [{"prompt": "x", "cfgs": []}]}, "samples[0]: key 'cfgs' must be a non-empty list"),
])
def test_bad_sample_files_name_the_file_and_the_key(tmp_path, content, message):
    path = write_json(tmp_path / "samples.json", content)
    with pytest.raises(ConfigError) as err:
        sampling.read_sample_settings(path, DEFAULTS)
    assert str(path) in str(err.value) and message in str(err.value)


def test_other_file_types_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="use a .txt file .* or a .json sample config"):
        sampling.read_sample_settings(tmp_path / "prompts.yaml", DEFAULTS)


def test_edits_during_training_apply_at_the_next_event_and_bad_edits_keep_the_settings(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="utils.watch.sampling")
    path = write_json(tmp_path / "samples.json", {"generate_samples_every_n_steps": 4, "samples": [{"prompt": "a"}]})
    schedule = SampleSchedule(path, DEFAULTS)
    assert [s for s in range(1, 13) if schedule.due(s)] == [4, 8, 12]

    write_json(path, {"generate_samples_every_n_steps": 5, "scheduler": "euler", "samples": [{"prompt": "b"}]})
    event = schedule.prepare(4, [])
    assert event.settings.scheduler == "euler" and [r.prompt for r in event.requests] == ["b"]
    assert "samples now every 5 steps (was 4); next after step 5" in caplog.text
    assert [s for s in range(5, 16) if schedule.due(s)] == [5, 10, 15]

    path.write_text('{"scheduler": "euler_b",')  # caught half-saved
    assert schedule.prepare(5, []).settings == event.settings
    write_json(path, {"scheduler": "euler_b"})
    assert schedule.prepare(10, []).settings == event.settings
    assert "not valid JSON" in caplog.text and "'euler_b', which is not a sampler" in caplog.text
    assert caplog.text.count("keeping the previous settings") == 2


def test_sampler_must_fit_the_loaded_model_at_startup_and_after_edits(tmp_path, tiny):
    zero_snr = {**tiny.scheduler.config, "rescale_betas_zero_snr": True}
    path = write_json(tmp_path / "samples.json", {"scheduler": "kdpm2"})
    with pytest.raises(ConfigError, match="scheduler 'kdpm2' .* cannot sample a zero-terminal-SNR model"):
        SampleSchedule(path, DEFAULTS).check_model(zero_snr)
    write_json(path, {"scheduler": "euler"})
    schedule = SampleSchedule(path, DEFAULTS)
    schedule.check_model(zero_snr)
    write_json(path, {"scheduler": "pndm"})
    assert schedule.prepare(10, []).settings.scheduler == "euler"


def test_command_line_wins_over_the_sample_file_which_wins_over_train_json(tmp_path, small_dataset):
    sample_file = write_json(tmp_path / "samples.json", {"generate_samples_every_n_steps": 3,
                                                         "generate_pretrain_samples": False})
    train_json = write_json(tmp_path / "train.json", {
        "resume_ckpt": str(TINY_MODEL), "data_root": str(small_dataset), "sample_prompts": str(sample_file),
        "sample_steps": 7, "generate_pretrain_samples": True})

    from_files = SampleSchedule.from_args(config.load(["--config", str(train_json)])).settings
    assert from_files.every_n_steps == 3 and not from_files.generate_pretrain_samples
    from_cli = SampleSchedule.from_args(config.load(["--config", str(train_json), "--sample_steps", "9",
                                                     "--generate_pretrain_samples"])).settings
    assert from_cli.every_n_steps == 9 and from_cli.generate_pretrain_samples

    sample_file.write_text("{broken")  # sampling switched off on the command line: the file is not read
    off = SampleSchedule.from_args(config.load(["--config", str(train_json), "--sample_steps", "0"]))
    assert not off.pretrain_due and not any(off.due(s) for s in range(1, 50))


def test_clip_skip_conditions_samples_as_training_does(tmp_path):
    """Samples with clip_skip 2 use the penultimate layer through the final layer norm (as training does), so they
    differ from clip_skip 0 and match a stock pipeline given that conditioning."""
    import contextlib

    from diffusers import StableDiffusionPipeline
    from torch.utils.tensorboard import SummaryWriter

    from utils.model import models
    from utils.watch.sampling import SampleEvent, SampleRequest, SampleSettings, generate_samples, make_sampler
    from utils.objective.step import encode_text

    model = models.load(TINY_MODEL)
    settings = SampleSettings(batch_size=1, seed=4, resolution=64, every_n_steps=1, generate_pretrain_samples=False,
                              cfgs=(1.0,), num_inference_steps=3)
    event = SampleEvent(settings, (SampleRequest(prompt="a red square", seed=4, size=(64, 64)),))

    def render(clip_skip, folder):
        with SummaryWriter(str(tmp_path / folder)) as writer:
            (jpeg,) = generate_samples(model, model.unet, model.text_encoder, event, step=0, out_dir=tmp_path / folder,
                                       tb_writer=writer, autocast=contextlib.nullcontext, clip_skip=clip_skip)
        return np.asarray(Image.open(jpeg), dtype=float)

    skipped, plain = render(2, "skip"), render(0, "plain")
    assert np.abs(skipped - plain).mean() > 0.5
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=make_sampler("ddim", model.scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ids = model.tokenizer(["a red square"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = pipe(prompt_embeds=encode_text(model.text_encoder, ids, 2), guidance_scale=1.0, height=64,
                        width=64, num_inference_steps=3, generator=[torch.Generator().manual_seed(4)]).images[0]
    expected.save(tmp_path / "expected.jpg", quality=95)
    tile = skipped[:40, :40]  # away from the cfg label
    assert np.abs(tile - np.asarray(Image.open(tmp_path / "expected.jpg"), dtype=float)[:40, :40]).max() <= 1


# ---------------------------------------------------------------- weighted prompts (Compel)

RED = 1  # the position of "red" in "red square": <start> red square <end> ...


def training_conditioning(tiny, texts: list[str], clip_skip: int = 0, attention_mask=None) -> torch.Tensor:
    """What training conditions on for these captions: the loader's 77 token ids through encode_text."""
    from utils.objective.step import encode_text

    ids = tiny.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encode_text(tiny.text_encoder, ids, clip_skip, attention_mask)


def sample_conditioning(tiny, requests: list[SampleRequest], clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return sampling.SamplePromptEncoder(tiny.tokenizer, tiny.text_encoder, clip_skip).encode(requests)


def weighted(tiny, prompt: str, clip_skip: int = 0) -> torch.Tensor:
    return sample_conditioning(tiny, [SampleRequest(prompt, seed=1, size=(64, 64))], clip_skip)[0]


PLAIN_PROMPTS = ["a red square", "a cat, a dog. two birds,green", "", " ".join(["a red square"] * 30),
                 "a (red square"]  # an unbalanced parenthesis is text


@pytest.mark.parametrize("clip_skip", [0, 2])
def test_compel_gives_plain_prompts_exactly_the_conditioning_training_gives(tiny, clip_skip):
    assert len(tiny.tokenizer(PLAIN_PROMPTS[3]).input_ids) > 77  # cut to 77 tokens, as training cuts a caption
    requests = [SampleRequest(prompt, seed=1, size=(64, 64), negative_prompt=negative)
                for prompt, negative in zip(PLAIN_PROMPTS, reversed(PLAIN_PROMPTS))]
    prompts, negatives = sample_conditioning(tiny, requests, clip_skip)
    assert torch.equal(prompts, training_conditioning(tiny, PLAIN_PROMPTS, clip_skip))
    assert torch.equal(negatives, training_conditioning(tiny, PLAIN_PROMPTS[::-1], clip_skip))


def test_a_caption_from_the_training_batch_is_not_parsed(tiny):
    caption = "a (red)1.5 square"
    random_caption = SampleRequest(caption, seed=1, size=(64, 64), random_caption=True)
    prompts, _ = sample_conditioning(tiny, [random_caption])
    assert torch.equal(prompts, training_conditioning(tiny, [caption]))
    assert not torch.equal(prompts, weighted(tiny, caption))


@pytest.mark.parametrize("clip_skip", [0, 2])
def test_a_weighted_word_moves_the_conditioning_the_way_asked(tiny, clip_skip):
    empty, plain = training_conditioning(tiny, ["", "red square"], clip_skip)
    up, down = weighted(tiny, "(red)1.5 square", clip_skip)[0], weighted(tiny, "(red)0.5 square", clip_skip)[0]
    # Up: the word's own embedding goes 1.5 times as far from the empty prompt's; the rest of the prompt stays.
    assert torch.allclose(up[RED] - empty[RED], 1.5 * (plain[RED] - empty[RED]), atol=1e-5)
    assert torch.equal(up[RED + 1:], plain[RED + 1:]) and torch.equal(up[:RED], plain[:RED])
    assert torch.equal(weighted(tiny, "red++ square", clip_skip), weighted(tiny, "(red)1.21 square", clip_skip))
    # Down: the word's embedding comes closer to the empty prompt's, and the words after it go half-way to what
    # they are when the text encoder does not see the word.
    unseen = torch.ones(1, 77, dtype=torch.long)
    unseen[0, RED] = 0
    without = training_conditioning(tiny, ["red square"], clip_skip, attention_mask=unseen)[0]
    assert torch.allclose(down[RED + 1:], (plain[RED + 1:] + without[RED + 1:]) / 2, atol=1e-6)
    assert (down[RED] - empty[RED]).norm() < (plain[RED] - empty[RED]).norm() < (up[RED] - empty[RED]).norm()
    assert (down - without).norm() < (plain - without).norm()


def test_a_blend_lies_between_its_prompts_closer_to_the_heavier(tiny):
    red, blue = training_conditioning(tiny, ["a red square", "a blue square"])
    blend = weighted(tiny, '("a red square", "a blue square").blend(0.7, 0.3)')[0]
    assert torch.allclose(blend, 0.7 * red + 0.3 * blue, atol=1e-6)
    assert (blend - red).norm() < (blend - blue).norm()


def test_weighted_negative_prompts_and_conjunctions_reach_the_unet_padded_to_one_length(tiny, tmp_path):
    embeddings = []
    hook = tiny.unet.register_forward_pre_hook(
        lambda module, args, kwargs: embeddings.append(kwargs["encoder_hidden_states"]), with_kwargs=True)
    settings = SampleSettings(batch_size=2, seed=1, resolution=64, every_n_steps=1, generate_pretrain_samples=False,
                              cfgs=(3.0,), num_inference_steps=1)
    requests = [SampleRequest("a red square", seed=1, size=(64, 64), negative_prompt="a (blue)1.5 circle"),
                SampleRequest('("a red square", "a blue circle").and()', seed=1, size=(64, 64))]
    try:
        render(tiny, tmp_path, settings, requests)
    finally:
        hook.remove()
    (conditioning,) = embeddings  # one step at one cfg: negatives first, then prompts
    empty, red_square, blue_circle = training_conditioning(tiny, ["", "a red square", "a blue circle"])
    weighted_negative, negative_of_the_and, prompt, conjunction = conditioning
    blue = 2  # <start> a blue circle <end>
    assert torch.allclose(weighted_negative[blue] - empty[blue], 1.5 * (blue_circle[blue] - empty[blue]), atol=1e-5)
    assert not torch.equal(weighted_negative[:77], blue_circle)
    # .and() puts the two prompts' 77 tokens side by side; the rest of the batch is padded with the empty prompt.
    assert torch.equal(conjunction, torch.cat([red_square, blue_circle]))
    assert torch.equal(prompt, torch.cat([red_square, empty]))
    assert torch.equal(weighted_negative[77:], empty) and torch.equal(negative_of_the_and, torch.cat([empty, empty]))


def test_automatic1111_weights_mean_what_they_mean_there(tiny):
    encoder = sampling.SamplePromptEncoder(tiny.tokenizer, tiny.text_encoder, clip_skip=0)
    spelled = [SampleRequest(prompt, seed=1, size=(64, 64), negative_prompt=negative) for prompt, negative in (
        ("a (red:1.3) square", "(blue : 0.5)"), ("a (red)1.3 square", "(blue)0.5"), ("a red square", "blue"))]
    (a1111, a1111_negative), (compel, compel_negative), (plain, plain_negative) = (
        encoder.encode([request]) for request in spelled)
    assert torch.equal(a1111, compel) and torch.equal(a1111_negative, compel_negative)
    assert not torch.equal(a1111, plain) and not torch.equal(a1111_negative, plain_negative)
    assert sampling.prompt_syntax_problem("a (red:1.3) square") == ""


@pytest.mark.parametrize("entry, message", [
    ({"prompt": "a cat", "negative_prompt": "(a, b).blend(0.5)"},
     "samples[0]: key 'negative_prompt' is \"(a, b).blend(0.5)\": Compel cannot parse it"),
    ({"prompt": "()"}, "nothing is left to encode"),
    ({"prompt": "a cat.swap(dog)"}, ".swap() needs cross-attention control"),
    ({"prompt": "useLora(style) a cat"}, "useLora()/withLora() would load a LoRA"),
])
def test_prompts_a_sample_could_not_encode_are_refused_when_the_file_is_read(tmp_path, entry, message):
    path = write_json(tmp_path / "samples.json", {"samples": [entry]})
    with pytest.raises(ConfigError) as err:
        sampling.read_sample_settings(path, DEFAULTS)
    assert str(path) in str(err.value) and message in str(err.value)
    assert "doc/SAMPLES.md, Weighted prompts" in str(err.value)


def test_prompt_syntax_is_checked_per_line_of_a_txt_and_not_for_ignored_prompts(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("a (red square\n\n()\n")
    with pytest.raises(ConfigError, match=r"prompts.txt: line 3 is \"\(\)\": once its syntax is read, nothing is left"):
        sampling.read_sample_settings(txt, DEFAULTS)
    txt.write_text("a (red square\nred) square\n\\(red:1.3\\) square\n")  # unbalanced or escaped: text
    assert [r.prompt for r in sampling.read_sample_settings(txt, DEFAULTS).requests] == [
        "a (red square", "red) square", "\\(red:1.3\\) square"]
    ignored = write_json(tmp_path / "samples.json", {"samples": [{"prompt": "()", "random_caption": True}]})
    assert sampling.read_sample_settings(ignored, DEFAULTS).requests[0].random_caption


def test_an_edit_with_a_prompt_compel_cannot_read_keeps_the_previous_settings(tmp_path, caplog):
    path = write_json(tmp_path / "samples.json", {"samples": [{"prompt": "(red)1.5 square"}]})
    schedule = SampleSchedule(path, DEFAULTS)
    write_json(path, {"samples": [{"prompt": "a red square"}, {"prompt": "(a, b).blend(0.5)"}]})
    assert [r.prompt for r in schedule.prepare(10, []).requests] == ["(red)1.5 square"]
    assert f"{path}: samples[1]: key 'prompt'" in caplog.text and "keeping the previous settings" in caplog.text


def test_the_user_pages_weighted_prompt_examples_are_accepted():
    page = (REPO / "doc" / "SAMPLES.md").read_text()
    section = page.split("### Weighted prompts")[1].split("\n###")[0]
    examples = [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")]
    assert len(examples) == 6
    assert all(sampling.prompt_syntax_problem(example) == "" for example in examples), examples
