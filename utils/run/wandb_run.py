"""Weights & Biases (the `wandb` option), as EveryDream2 does it: every scalar, image and text the run's
TensorBoard writer records is mirrored to a W&B run. wandb is an optional package: utils.options.config refuses
`wandb: true` without it, before anything is loaded."""
from __future__ import annotations

from pathlib import Path

from utils.options.values import ConfigError


def start(run_folder: Path, project: str, run_name: str, config: dict):
    """A W&B run whose files go in `run_folder`/wandb. Call before the run's SummaryWriter is made."""
    import wandb

    wandb.tensorboard.patch(root_logdir=str(run_folder), save=False)
    try:
        return wandb.init(project=project, name=run_name, dir=str(run_folder), config=config)
    except Exception as e:  # noqa: BLE001 - wandb reports login, network and settings problems in many types
        wandb.tensorboard.unpatch()
        wandb.teardown()
        raise ConfigError(f"wandb: could not start a Weights & Biases run ({type(e).__name__}: {e}). Run `wandb "
                          "login` once, or set the environment variable WANDB_MODE=offline to log on this machine "
                          "only (`wandb sync` uploads it later), or turn wandb off.") from e


def finish(run, exit_code: int) -> None:
    import wandb

    run.finish(exit_code=exit_code)
    # A later run in the same process (a notebook, the tests) starts afresh: a plain TensorBoard writer, and W&B
    # settings read again from the environment.
    wandb.tensorboard.unpatch()
    wandb.teardown()
