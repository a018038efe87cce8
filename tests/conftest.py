"""Shared fixtures: the repo paths, offline mode, and small real datasets written to disk."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = REPO / "demo" / "tiny-sd"
DEMO_DATA = REPO / "demo" / "data"
SQUARE_SIZE, SQUARE_CAPTION = 64, "a square"  # the `squares` data set

os.environ["HF_HUB_OFFLINE"] = "1"  # any attempt to reach a hub fails loudly instead of hanging
# The tests run on the CPU on every machine, as in CI: their exact values (bit-exact resume, losses checked against
# an uncompiled run) are CPU ones, and a GPU's kernels round differently. Set before torch first looks for a GPU;
# setting CUDA_VISIBLE_DEVICES yourself runs the few GPU-only tests (e.g. tests/test_memory.py -k on_cuda).
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Without a GPU, Triton runs its kernels in its interpreter on CPU tensors (tests/test_fused_8bit.py); it reads this
# when triton is first imported. Training never calls them on the CPU.
if not os.environ["CUDA_VISIBLE_DEVICES"]:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(REPO))


def options(*argv: str):
    """train.py's options for the tiny model and the demo data, as parsed from the command line with `argv` added:
    every flag at its default unless given, so a new flag needs no test changed."""
    from utils.options import config

    return config.load(["--resume_ckpt", str(TINY_MODEL), "--data_root", str(DEMO_DATA), *argv])


@pytest.fixture(autouse=True)
def forget_modules_from_temporary_folders(tmp_path_factory):
    """Plugin modules that a test imports from its temporary folder (a `plugins` package, say) are dropped
    afterwards, with the sys.path entries that plugin loading added, so a later test's folder with a module of
    the same name is imported afresh."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    root = str(tmp_path_factory.getbasetemp())
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        places = [getattr(spec, "origin", None), *(getattr(spec, "submodule_search_locations", None) or [])]
        if any(str(place).startswith(root) for place in places if place):
            del sys.modules[name]


DEMO_COMMAND = "python train.py --config cfgs/demo.json"  # the README's demo command
DEMO_TIMEOUT = 900  # seconds


class BackgroundDemo:
    """The README's demo command in a process of its own, with --logdir / --save_ckpt_dir pointed at `out`. It
    trains single-threaded: on a 2-core machine it then has one core and the tests the other (two processes of
    two threads each would keep stopping to wait for each other's preempted threads)."""

    def __init__(self, out: Path):
        self.out = out
        command = DEMO_COMMAND.replace("python", sys.executable, 1).split() + \
            ["--logdir", str(out / "logs"), "--save_ckpt_dir", str(out / "single")]
        self.stdout, self.stderr = open(out / "stdout.txt", "wb"), open(out / "stderr.txt", "wb")
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                        stdout=self.stdout, stderr=self.stderr)

    def running(self) -> bool:
        return self.process.poll() is None

    def result(self) -> dict:
        """Waits for the demo (DEMO_TIMEOUT seconds from its start in all) and returns its run folder, its
        single-file folder and its console output."""
        try:
            self.process.wait(timeout=max(1.0, DEMO_TIMEOUT - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the demo did not finish within {DEMO_TIMEOUT} s")
        self.stop()
        stdout, stderr = ((self.out / name).read_text(encoding="utf-8", errors="replace")
                          for name in ("stdout.txt", "stderr.txt"))
        assert self.process.returncode == 0, stdout[-3000:] + stderr[-3000:]
        (run_dir,) = (self.out / "logs").iterdir()
        return {"run": run_dir, "single": self.out / "single", "log": stdout + stderr}

    def stop(self) -> None:
        if self.running():
            self.process.kill()
            self.process.wait()
        self.stdout.close()
        self.stderr.close()


@pytest.fixture(scope="session", autouse=True)
def demo_in_background(request, tmp_path_factory):
    """When the session has tests of the demo's outputs (tests/e2e/test_train.py's `demo_run`), the demo starts
    before the first test, and trains while the other tests run; `demo_run` waits for it. None otherwise."""
    if not any("demo_run" in item.fixturenames for item in request.session.items):
        yield None
        return
    demo = BackgroundDemo(tmp_path_factory.mktemp("demo"))
    yield demo
    demo.stop()


@pytest.fixture(scope="module", autouse=True)
def one_thread_while_the_demo_trains(demo_in_background):
    """While the demo trains on one core, the tests (and the processes they start) use one thread, on the other
    core; once it is done, the thread count they were started with. Set per module, so that the runs of a module,
    which its tests may compare bit for bit, all train with one thread count."""
    import torch

    if demo_in_background is None:
        yield
        return
    threads, variable = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    if demo_in_background.running():
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if variable is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = variable


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    """Eight captioned 64x64 images of two colours in two buckets' worth of shapes."""
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    for i in range(8):
        colour = (220, 30, 30) if i % 2 else (30, 30, 220)
        size = (64, 64) if i < 6 else (96, 64)
        Image.new("RGB", size, colour).save(root / f"img_{i}.png")
        (root / f"img_{i}.txt").write_text("a red square" if i % 2 else "a blue square")
    return root


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> Path:
    """Eight flat red or blue squares under one caption: a two-mode image distribution for one prompt, which a
    first rectified flow can only reach along curved paths (it averages the two at first)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("squares")
    for i in range(8):
        Image.new("RGB", (SQUARE_SIZE, SQUARE_SIZE), (220, 30, 30) if i % 2 else (30, 30, 220)).save(root / f"sq_{i}.png")
        (root / f"sq_{i}.txt").write_text(SQUARE_CAPTION)
    return root


def write_json(path: Path, data: dict) -> Path:
    import json

    path.write_text(json.dumps(data, indent=2))
    return path


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]} | \
        {"_images": events.Tags()["images"]}


def tensorboard_images(run: Path) -> dict[str, list[tuple[int, tuple[int, int]]]]:
    """{tag: [(step, (width, height)), ...]} of the images in a run's event file."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    return {tag: [(e.step, Image.open(io.BytesIO(e.encoded_image_string)).size) for e in events.Images(tag)]
            for tag in events.Tags()["images"]}


def read_wandb(run_dir: Path) -> dict:
    """The W&B run that a run with `wandb` on wrote in offline mode under its folder, read back from W&B's own
    record file (a LevelDB-style log of protobuf records): {"run": the run record, "config": {key: value},
    "history": [{key: value}], "exit_code": int, "files": its files folder}."""
    import json

    from wandb.proto import wandb_internal_pb2

    (record_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = record_file.read_bytes()
    assert data[:4] == b":W&B", record_file
    block, position, pending, records = 32 * 1024, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a record header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        if kind in (2, 3):  # first or middle piece of a record split across blocks
            pending = (pending if kind == 3 else b"") + chunk
            continue
        if kind not in (1, 4):  # 1: a whole record, 4: the last piece
            break
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending + chunk if kind == 4 else chunk)
        records.append(record)
    by_kind = {}
    for record in records:
        by_kind.setdefault(record.WhichOneof("record_type"), []).append(record)
    (run,) = by_kind["run"]
    (exit_record,) = by_kind["exit"]
    return {"run": run.run, "config": {item.key: json.loads(item.value_json) for item in run.run.config.update},
            "history": [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item} for record in by_kind.get("history", [])],
            "exit_code": exit_record.exit.exit_code, "files": record_file.parent / "files"}


def wandb_scalars(wandb_run: dict, tag: str) -> dict[int, float]:
    """{global step: value} of one scalar in a read_wandb result, comparable with dict(read_scalars(...)[tag])."""
    return {row["global_step"]: row[tag] for row in wandb_run["history"] if tag in row}


def short_run(tmp_path, data_root, *extra: str) -> Path:
    """A short in-process run on the tiny model; returns its run folder."""
    import train

    logdir = tmp_path / "logs"
    status = train.main(["--resume_ckpt", str(REPO / "demo" / "tiny-sd"), "--data_root", str(data_root),
                         "--resolution", "128", "--batch_size", "2", "--optimizer_config",
                         str(REPO / "cfgs" / "tiny_optimizer.json"), "--sample_steps", "0", "--log_step", "1",
                         "--logdir", str(logdir), "--no_save_ckpt", *extra])
    assert status == 0
    return max(logdir.iterdir(), key=lambda p: p.stat().st_mtime)
