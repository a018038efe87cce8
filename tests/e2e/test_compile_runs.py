"""`compile` in a real run of the tiny model, compiled on the CPU."""
from __future__ import annotations

from tests.conftest import read_scalars, short_run


def test_a_compiled_run_trains_through_two_aspect_buckets(tmp_path, small_dataset, monkeypatch):
    """Buckets of two aspect ratios give the UNet latents of two sizes. torch by default compiles the second size
    for any size, and that compile of the UNet failed in torch's inductor and stopped the run; each size compiled
    for itself trains through both."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # compiled here, not found in a cache
    run = short_run(tmp_path, small_dataset, "--compile", "--max_epochs", "1")
    losses = read_scalars(run)["loss/log_step"]
    assert len(losses) == 4 and all(0 < loss < 10 for _, loss in losses)
