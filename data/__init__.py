"""Training data: scan a folder, bucket by aspect, plan batches per epoch, load them as tensors.

Typical use (one epoch):
    result = scan(data_root); result.require_images()
    records = assign_buckets(result.records, resolution)
    plan = build_epoch_batches(records, batch_size, seed, epoch)
    for batch in make_epoch_loader(plan, records, tokenizer, cond_dropout, seed, epoch, workers,
                                   pin_memory): ...
"""

from data.batching import Batch, PlanSummary, build_epoch_batches, epoch_plan_summary
from data.buckets import assign_buckets, buckets_for, is_undersized, nearest_bucket
from data.loader import make_epoch_loader, write_schedule
from data.records import Caption, DataError, ImageRecord, Tag
from data.scan import ScanResult, scan

__all__ = [
    "Batch", "Caption", "DataError", "ImageRecord", "PlanSummary", "ScanResult", "Tag",
    "assign_buckets", "build_epoch_batches", "buckets_for", "epoch_plan_summary", "is_undersized",
    "make_epoch_loader", "nearest_bucket", "scan", "write_schedule",
]
