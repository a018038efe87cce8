"""`compile` in a real run of the tiny model, compiled on the CPU."""
from __future__ import annotations

import pytest

from tests.conftest import read_scalars, short_run


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
