"""`compile` in a real run of the tiny model, compiled on the CPU."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_MODEL, options, read_scalars, short_run


def test_a_compiled_run_trains_through_two_aspect_buckets_as_the_uncompiled_one(tmp_path, small_dataset,
                                                                                 monkeypatch):
    """Buckets of two aspect ratios give the UNet latents of two sizes. torch by default compiles the second size
    for any size, and that compile of the UNet failed in torch's inductor and stopped the run; each size compiled
    for itself trains through both, to the losses of the same run uncompiled (up to float rounding)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # compiled here, not found in a cache
    losses = {}
    for name, extra in (("compiled", ["--compile"]), ("eager", [])):
        (tmp_path / name).mkdir()
        run = short_run(tmp_path / name, small_dataset, "--max_epochs", "1", *extra)
        losses[name] = [loss for _, loss in read_scalars(run)["loss/log_step"]]
    assert len(losses["compiled"]) == 4  # 6 square and 2 wide images in batches of 2
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)


@pytest.mark.parametrize("text_encoder_trained", [True, False])
def test_compile_compiles_the_text_encoder_as_well_as_the_unet(text_encoder_trained):
    """Uncompiled, the text encoder's many small kernels keep a compiled SD step's GPU waiting (run P of
    doc/PERFORMANCE.md): `compile` compiles it too, trained or frozen, and leaves the VAE (it runs once per image
    with the latent cache) and the modules' state_dict keys as they are."""
    from accelerate import Accelerator

    from utils.model.models import load
    from utils.run.setup import prepare_models

    model = load(TINY_MODEL)
    keys = {part: getattr(model, part).state_dict().keys() for part in ("unet", "text_encoder")}
    args = options("--vram", "off", "--no-channels_last", "--compile",
                   "--no-disable_textenc_training" if text_encoder_trained else "--disable_textenc_training")
    trained = prepare_models(model, args, Accelerator(cpu=True))
    assert ("text_encoder" in trained) == text_encoder_trained
    for part in ("unet", "text_encoder"):
        module = getattr(model, part)
        assert module._compiled_call_impl is not None, part  # what nn.Module.compile sets; the call compiles lazily
        assert module.state_dict().keys() == keys[part]
    assert model.vae._compiled_call_impl is None
    assert torch._dynamo.config.recompile_limit >= 16  # 8 for each of the two, which may share one wrapper function
