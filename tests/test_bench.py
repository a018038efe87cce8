"""scripts/bench.py train on CPU with the tiny model: it runs train.py's own step code for each recipe, prints
the table, and its numbers hang together (MFU from its parts, the phase breakdown accounting for the step)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_bench_train_prints_its_tables_and_consistent_numbers(tmp_path):
    """Under --vram-cap (on the CPU nothing is capped, but the runs are named and planned for it) each recipe fills
    a latent cache of its own, renders a sample pass, and reports the memory plan's estimate for its means."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "scripts/bench.py", "train", "--model", "tiny", "--recipes", "reference", "default",
               "lowvram", "default", "--images", "24", "--warmup", "1", "--steps", "3", "--min-images", "1", "--sample-steps",
               "1", "--vram-cap", "6", "--cache", str(tmp_path / "cache"), "--json", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| recipe | batch | images/s | x reference | MFU |")
    names = ["| reference@6GiB", "| default@6GiB", "| lowvram@6GiB", "| default@6GiB (2)"]  # a repeat keeps both
    assert [row.split(" | ")[0] for row in table[1:5]] == names
    assert table[5].startswith("| recipe | batch | means on | optimizer (UNet) |")
    memory_rows = [row.split(" | ") for row in table[6:]]
    assert [row[0] for row in memory_rows] == names
    assert memory_rows[2][2] == "fused_backward, gradient_checkpointing, bf16_weights"  # cfgs/lowvram.json
    assert (tmp_path / "cache" / "samples").is_dir()

    report = json.loads(out.read_text())
    assert report["command"].startswith("python scripts/bench.py train --model tiny")
    flops = report["flops_per_image"]
    assert flops["unet"] > 0 and flops["text_encoder"] > 0 and flops["unet"] + flops["text_encoder"] <= flops["total"]
    recipes = {name.removesuffix("@6GiB"): r for name, r in report["recipes"].items()}
    assert [r["batch_size"] for r in recipes.values()] == [8, 8, 1, 8]  # reference, train.json, lowvram.json, again
    assert all(r["vram_cap_gib"] == 6 for r in recipes.values())
    for name in ("default", "lowvram"):  # each fills a fresh cache of its own, and that is timed
        assert "cache_build_images_per_s" in recipes[name]
    assert recipes["lowvram"]["estimate_gib"] < recipes["default"]["estimate_gib"]
    assert recipes["lowvram"]["estimate_parts_gib"]["trained weights"] == pytest.approx(
        recipes["default"]["estimate_parts_gib"]["trained weights"] / 2, abs=1e-3)  # bf16 against fp32
    for name, r in recipes.items():
        assert r["images_per_s"] == pytest.approx(r["batch_size"] * 1000 / r["step_ms"], rel=1e-6), name
        assert r["sample_pass_s"] > 0, name
        assert r["mfu"] == pytest.approx(flops["total"] * r["images_per_s"] / report["matmul_flops_per_s"]), name
        phases = r["phases_ms"]
        assert set(phases) == {"idle", "vae", "text_encoder", "unet", "backward", "optimizer"}, name
        assert sum(phases.values()) == pytest.approx(r["step_ms"], rel=0.05, abs=2.0), name
    assert recipes["reference"]["phases_ms"]["vae"] > 3 * recipes["default"]["phases_ms"]["vae"]  # cached latents
    # 24 images are 3 steps of 8 per epoch: 1 is timed after the 2 start-up steps, and the report says so
    assert recipes["reference"]["timed_steps"] == 1 and recipes["lowvram"]["timed_steps"] == 3
    assert recipes["reference"]["notes"][-1] == ("timed 1 of the 3 steps asked: 24 images make 3 steps of 8 per "
                                                 "epoch; give more --images for a steadier rate")
    assert recipes["lowvram"]["notes"] == []


def test_bench_train_under_torchrun_trains_the_global_batch_and_reports_once(tmp_path):
    """Launched with two processes, as doc/PERFORMANCE.md's scaling runs are: each process trains its share of a
    global batch of 2 x batch_size, images/s counts both, and only the first process reports."""
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "scripts/bench.py", "train", "--model", "tiny", "--recipes", "default",
               "--images", "80", "--warmup", "1", "--steps", "3", "--min-images", "1",
               "--cache", str(tmp_path / "cache"), "--json", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [line for line in result.stdout.splitlines() if line.startswith("| default")][0].startswith(
        "| default | 2 x 8 |")
    assert result.stdout.count('"recipes"') == 1  # one report, from the first process
    report = json.loads(out.read_text())
    r = report["recipes"]["default"]
    assert (r["processes"], r["batch_size"], r["global_batch"]) == (2, 8, 16)
    assert r["timed_steps"] == 3
    assert r["images_per_s"] == pytest.approx(16 * 1000 / r["step_ms"], rel=1e-6)
    assert r["mfu"] == pytest.approx(report["flops_per_image"]["total"] * r["images_per_s"]
                                     / (2 * report["matmul_flops_per_s"]))


def test_bench_optimizer_steps_every_tensor_of_each_variant(tmp_path):
    """bench.py optimizer sets the UNet (channels-last) and text encoder up as train.py does and steps each variant
    once: every trained tensor moves, also where a stand-in steps for its parameter (bf16 weights, bitsandbytes,
    the backward pass's buckets), and the device is never done before the host has queued the step."""
    out = tmp_path / "optimizer.json"
    variants = ["adamw8bit_fused", "adamw_bf16_fused", "adamw8bit_bf16", "adamw8bit_bf16_fused"]
    command = [sys.executable, "scripts/bench.py", "optimizer", "--model", "tiny", "--steps", "1", "--variants",
               *variants, "--json", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| variant | optimizer | weights | fused_backward | tensors updated |")
    assert [row.split(" | ")[0] for row in table[1:]] == [f"| {name}" for name in variants]
    rows = json.loads(out.read_text())["variants"]
    for name, row in rows.items():
        assert row["tensors"] > 100 and row["tensors_updated"] == row["tensors"], name
        assert 0 < row["host_ms"] <= row["done_ms"], name
    assert rows["adamw_bf16_fused"]["weights"] == "bf16" and rows["adamw8bit_fused"]["fused_backward"]
