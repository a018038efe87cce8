"""The run's log folder: text log, effective config copy, TensorBoard events, samples and checkpoints. With several
training processes only the first makes one (train.py)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

from tqdm.auto import tqdm

from utils.options.config import ConfigError, effective_options
from utils.run import wandb_run

log = logging.getLogger("train")


class _TqdmHandler(logging.Handler):
    """Console output that does not tear the progress bars."""

    def emit(self, record):
        tqdm.write(self.format(record))


def setup_console_logging() -> None:
    root = logging.getLogger()
    # Of several training processes (torchrun and accelerate launch number them in RANK), the first speaks for all;
    # the others report only errors.
    root.setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.ERROR)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.handlers[:] = [handler]
    for noisy in ("diffusers", "transformers", "accelerate", "PIL", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class RunDir:
    """`<logdir>/<project_name>_<YYYYMMDD-HHMMSS>/` and what goes in it. As in EveryDream2, `run_name` does not name
    the folder: it names the run for trackers (TensorBoard's `config` and `run_name` texts, the log, _main.json)."""

    def __init__(self, args: SimpleNamespace, optimizer_config: dict | None = None):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{args.project_name}_{stamp}"
        Path(args.logdir).mkdir(parents=True, exist_ok=True)
        path, number = Path(args.logdir) / name, 1
        while True:  # never write into an earlier run's folder, e.g. one started in the same second
            try:
                path.mkdir()
                break
            except FileExistsError:
                number += 1
                path = path.with_name(f"{name}-{number}")
        self.path = path
        self.name = path.name
        self.run_name = args.run_name or self.name  # what trackers call the run
        options = effective_options(args)
        self.wandb = None
        if args.wandb:
            try:
                self.wandb = wandb_run.start(path, args.project_name, self.run_name,
                                             {"main_cfg": options, "optimizer_cfg": optimizer_config})
            except ConfigError:
                shutil.rmtree(path)  # made a moment ago and holding only W&B's attempt: no trace of a run
                raise
        self.ckpts = path / "ckpts"
        self.samples = path / "samples"
        for folder in (self.ckpts, self.samples):
            folder.mkdir(parents=True, exist_ok=True)
        self.file_log = logging.FileHandler(path / f"{self.name}.log", encoding="utf-8")
        self.file_log.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%m/%d/%Y %I:%M:%S %p"))
        logging.getLogger().addHandler(self.file_log)
        (path / f"{self.name}_main.json").write_text(json.dumps(options, indent=2) + "\n")
        log.info("Run: %s (project %s), logging to %s", self.run_name, args.project_name, path)

        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(path), flush_secs=20)
        self.tb.add_text("config", ", ".join(f"{k}={options[k]}" for k in sorted(options)))
        self.tb.add_text("run_name", self.run_name)

    def write_json(self, suffix: str, data) -> None:
        (self.path / f"{self.name}_{suffix}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")

    def close(self, exit_code: int) -> None:
        self.tb.close()
        if self.wandb is not None:
            wandb_run.finish(self.wandb, exit_code)
        logging.getLogger().removeHandler(self.file_log)
        self.file_log.close()
