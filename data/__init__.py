"""Training data: scan a folder or manifest, bucket by aspect, plan batches per epoch, load them.

Typical use (one run):
    result = scan(data_root); result.require_images()
    records = assign_buckets(result.records, resolution)
    for epoch in ...:
        plan = build_epoch_batches(records, batch_size, seed, epoch, grad_accum, rated)
        loader = make_epoch_loader(plan, records, tokenizer, cond_dropout, seed, epoch, workers,
                                   pin_memory, flip_p=..., shuffle_tags=..., keep_tags=...,
                                   skipped=result.skipped, plugins=runner)  # runner: a PluginRunner or None
        write_schedule(path, loader.dataset)   # optional: what each step trains
        for batch in loader: ...
doc/DATA.md describes the dataset conventions for users.
"""

from data.batching import (Batch, PlanSummary, RatedDataset, build_epoch_batches, epoch_items,
                           epoch_plan_summary)
from data.buckets import (assign_buckets, buckets_for, is_undersized, nearest_bucket,
                          report_undersized)
from data.loader import EpochBatches, EpochLoader, SampleOptions, make_epoch_loader, token_ids, write_schedule
from data.records import Caption, DataError, ImageRecord, SkippedFiles, Tag
from data.scan import ScanResult, scan

__all__ = [
    "Batch", "Caption", "DataError", "EpochBatches", "EpochLoader", "ImageRecord", "PlanSummary",
    "RatedDataset", "SampleOptions", "ScanResult", "SkippedFiles", "Tag", "assign_buckets",
    "build_epoch_batches", "buckets_for", "epoch_items", "epoch_plan_summary", "is_undersized",
    "make_epoch_loader", "nearest_bucket", "report_undersized", "scan", "token_ids", "write_schedule",
]
