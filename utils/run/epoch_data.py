"""The run's data, epoch by epoch: each epoch's batch plan (planned for the global batch of all processes) and the
loaders of this process's share of it (data/ does the work; this holds the run's settings for it)."""
from __future__ import annotations

from pathlib import Path

import data
from data.batching import process_share

_CACHE = object()  # "the run's latent cache", as a default that None (no cache) can override


class EpochData:
    def __init__(self, records, skipped, tokenizer, args, accelerator, workers: int, rated=None, latent_cache=None,
                 plugins=None):
        self.records, self.skipped, self.tokenizer, self.args = records, skipped, tokenizer, args
        self.rank, self.processes = accelerator.process_index, accelerator.num_processes
        self.global_batch = args.batch_size * self.processes
        self.pin_memory = accelerator.device.type == "cuda"
        self.workers, self.rated, self.latent_cache, self.plugins = workers, rated, latent_cache, plugins

    def plan(self, epoch: int, grad_accum: int) -> list[data.Batch]:
        return data.build_epoch_batches(self.records, self.global_batch, self.args.seed, epoch, grad_accum, self.rated)

    def loader(self, plan, epoch: int, start_step: int = 0, cache=_CACHE, whole: bool = False):
        """This process's share of `plan` (or, `whole`, every process's slots), from `start_step` on."""
        args = self.args
        return data.make_epoch_loader(plan if whole else process_share(plan, self.rank, self.processes), self.records,
                                      self.tokenizer, cond_dropout=args.cond_dropout, seed=args.seed, epoch=epoch,
                                      num_workers=self.workers, pin_memory=self.pin_memory, flip_p=args.flip_p,
                                      shuffle_tags=args.shuffle_tags, keep_tags=args.keep_tags,
                                      skipped=self.skipped, start_step=start_step,
                                      latent_cache=self.latent_cache if cache is _CACHE else cache,
                                      plugins=self.plugins)

    def first_captions(self) -> list[str]:
        """The captions of epoch 0's first batch (pre-training samples of random captions use them)."""
        return next(iter(self.loader(self.plan(0, self.args.grad_accum), 0, whole=True)))["captions"]

    def write_schedule(self, path: Path, plan, epoch: int) -> None:
        data.write_schedule(path, self.loader(plan, epoch, whole=True).dataset)
