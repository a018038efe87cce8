"""Checkpoint bookkeeping: atomic writes, names, and `findlast`."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
EMA_SUFFIX = "_ema"  # an EMA checkpoint is saved as <name>_ema beside <name>


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yields a scratch folder next to `final` and renames it to `final` only once everything was written.

    An interrupted save leaves a `*.partial` folder (ignored by findlast and removed by the next save of that
    name), never a half-written folder under the final name.
    """
    final = Path(final)
    scratch = final.with_name(final.name + PARTIAL_SUFFIX)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        yield scratch
        give_user_permissions(scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if final.exists():
        # Same name saved twice (e.g. a re-run into the same folder): move the old one aside until the new is in.
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(scratch, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(scratch, final)


@contextlib.contextmanager
def atomic_file(final: Path):
    """Yields a temporary path next to `final`; it replaces `final` in one rename once written."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Named per process: two processes writing the same file (the latent cache under multi-GPU) never share it.
    scratch = final.with_name(f"{final.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        yield scratch
        give_user_permissions(scratch)
        os.replace(scratch, final)
    finally:
        scratch.unlink(missing_ok=True)


def umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_user_permissions(path: Path) -> None:
    """The permissions any file the user creates gets (0666 / 0777 less the umask, so usually 0644 / 0755), for a
    file or a folder and everything in it. safetensors writes its files 0600 whatever the umask, which a model
    folder shared with an image generator running as another user (or in a container) cannot read."""
    mask = umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def checkpoint_name(project_name: str, epoch: int, global_step: int, prefix: str = "") -> str:
    return f"{prefix}{project_name}-ep{epoch:02d}-gs{global_step:05d}"


def find_last(logdir: str | Path, project: str | None = None, ema: bool = False) -> Path:
    """The newest complete diffusers checkpoint folder under logdir (not errored, not partial): of any run, as
    EveryDream2's `findlast`, or of `project`'s runs only (`<logdir>/<project>_<YYYYMMDD-HHMMSS>[-N]/...`) when given.

    Training checkpoints only, or with `ema` only the EMA ones (folders named `*_ema`).
    """
    key = "ema_resume_model" if ema else "resume_ckpt"
    run_folder = re.compile(re.escape(project) + r"_\d{8}-\d{6}(-\d+)?") if project is not None else None
    folders = [index.parent for index in Path(logdir).rglob("model_index.json")]
    candidates = [f for f in folders if f.name.endswith(EMA_SUFFIX) == ema and not f.name.endswith(PARTIAL_SUFFIX)
                  and (run_folder is None or run_folder.fullmatch(f.relative_to(logdir).parts[0]))]
    if not candidates:
        kind = f"EMA checkpoint folder (`*{EMA_SUFFIX}`, with model_index.json)" if ema else \
            "checkpoint folder (with model_index.json)"
        scope = (f" in runs of project {project!r} (findlast_scope 'project'; set it to 'logdir' to search every "
                 "run)") if project is not None else ""
        raise FileNotFoundError(f"{key} 'findlast': no {kind} under '{logdir}'{scope}. Train once first, or set "
                                f"{key} to a model.")
    newest = max(candidates, key=lambda p: (p / "model_index.json").stat().st_mtime)
    if "errored" in newest.name:
        raise FileNotFoundError(f"{key} 'findlast': the newest checkpoint '{newest}' was saved after an error. "
                                f"Check it, then set {key} to it explicitly if you want to continue from it.")
    return newest


def find_last_for(args, ema: bool = False) -> Path:
    """`findlast` for resume_ckpt (or with `ema`, ema_resume_model) where the options say: the whole logdir, or
    with findlast_scope 'project' this project's runs."""
    return find_last(args.logdir, args.project_name if args.findlast_scope == "project" else None, ema)


class SaveTimer:
    """Says when a timed checkpoint is due (every `minutes`, counted from the start or the last save)."""

    def __init__(self, minutes: float | None):
        self.minutes = minutes
        self.last = time.monotonic()

    def due(self) -> bool:
        if self.minutes is None or time.monotonic() - self.last < self.minutes * 60:
            return False
        self.last = time.monotonic()
        return True
