"""Benchmarks: `python scripts/bench.py <subcommand> [options]`; results are recorded in doc/PERFORMANCE.md.

Subcommands (each registered in `SUBCOMMANDS` with its help, its arguments and the function that runs it):
  data   the data pipeline on CPU: scan speed on a generated folder of N small captioned images, then
         images/s of the DataLoader alone (decode, crop, resize, flip, tokenize) at 0/1/2 workers.

Generated datasets are cached under --cache (default /tmp/sdtrainer-bench) so a rerun only measures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Aspect ratios of generated images: every one lands in a different bucket at 512.
SMALL_SIZES = [(96, 96), (128, 96), (96, 128), (160, 96), (96, 160), (192, 80)]
FOLDER_SIZE = 1000  # images per generated subfolder, as large datasets are usually split
GENERATOR_VERSION = 1  # bump when the generated data changes, so stale caches are not reused


def _write_images(job: tuple[str, int, int, tuple[int, int] | None, int]) -> None:
    """Writes images [start, stop) of one folder: noisy gradients (JPEG-compress like photos), each with a
    caption .txt and, every tenth, a yaml sidecar instead."""
    import numpy as np
    from PIL import Image

    folder, start, stop, size, quality = job
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        w, h = size or SMALL_SIZES[i % len(SMALL_SIZES)]
        gradient = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
        pixels = np.clip(gradient + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        stem = os.path.join(folder, f"img_{i:06d}")
        Image.fromarray(pixels).save(stem + ".jpg", quality=quality)
        if i % 10:
            Path(stem + ".txt").write_text(f"image {i}, gradient, noise, tag{i % 37}")
        else:
            Path(stem + ".yaml").write_text(f"main_prompt: image {i}\ntags:\n  - tag: gradient\n    weight: 1.5\n"
                                            f"  - noise\nmultiply: 1\n")


def generated_dataset(cache: Path, count: int, size: tuple[int, int] | None, quality: int, name: str) -> Path:
    """A folder of `count` captioned JPEGs in subfolders of FOLDER_SIZE, plus a global.yaml and a
    multiply.txt as real datasets have; generated once (in parallel processes) and reused."""
    root = cache / f"{name}-{count}-v{GENERATOR_VERSION}"
    done = root / ".complete"
    if done.exists():
        return root
    print(f"generating {count} images in {root} (cached for later runs) ...", flush=True)
    started = time.perf_counter()
    jobs = [(str(root / f"part{start // FOLDER_SIZE:04d}"), start, min(start + FOLDER_SIZE, count), size, quality)
            for start in range(0, count, FOLDER_SIZE)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write_images, jobs))
    (root / "global.yaml").write_text("tags:\n  - generated\n")
    (root / "part0000" / "multiply.txt").write_text("1.0\n")
    done.write_text("")
    print(f"  generated in {time.perf_counter() - started:.0f} s", flush=True)
    return root


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (scan and DataLoader worker processes are joined
    before we read it). Reported beside wall time: on a shared machine wall time also counts the waiting."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _timed(fn):
    started, cpu = time.perf_counter(), _cpu_seconds()
    result = fn()
    return result, time.perf_counter() - started, _cpu_seconds() - cpu


def _loader_rate(records, batch_size: int, workers: int, tokenizer) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the DataLoader alone over one epoch of `records`, worker start-up
    included (a new loader starts its workers every epoch)."""
    import data

    plan = data.build_epoch_batches(records, batch_size, seed=1, epoch=0)
    loader = data.make_epoch_loader(plan, records, tokenizer, cond_dropout=0.04, seed=1, epoch=0,
                                    num_workers=workers, flip_p=0.5, shuffle_tags=True)
    images, wall, cpu = _timed(lambda: sum(batch["pixel_values"].shape[0] for batch in loader))
    return images / wall, 1000 * cpu / images


def cmd_data(args) -> dict:
    import data
    from utils.shipped import load_tokenizer

    cache = Path(args.cache)
    root = generated_dataset(cache, args.images, None, 85, "small")
    load_before = os.getloadavg()[0]
    result, scan_s, scan_cpu = _timed(lambda: data.scan(str(root)))
    assert len(result.records) == args.images, (len(result.records), result.summary_lines()[:5])
    records, bucket_s, _ = _timed(lambda: data.assign_buckets(result.records, args.resolution))
    _, plan_s, _ = _timed(lambda: data.build_epoch_batches(records, args.batch_size, seed=1, epoch=0))
    out = {
        "images": args.images,
        "load_average_before_scan": round(load_before, 2),
        "scan_s": round(scan_s, 2), "scan_cpu_s": round(scan_cpu, 2), "scan_images_per_s": round(args.images / scan_s),
        "assign_buckets_s": round(bucket_s, 2), "build_epoch_batches_s": round(plan_s, 2),
    }
    print(f"scan: {args.images} images in {scan_s:.1f} s wall, {scan_cpu:.1f} s CPU ({args.images / scan_s:.0f} "
          f"images/s; load average before: {load_before:.1f}); assign_buckets {bucket_s:.2f} s; "
          f"build_epoch_batches {plan_s:.2f} s", flush=True)

    tokenizer = load_tokenizer("sd1")
    photo_w, photo_h = (int(v) for v in args.loader_size.split("x"))
    photos = generated_dataset(cache, args.loader_images, (photo_w, photo_h), 90, f"photo{photo_w}x{photo_h}")
    loader_sets = {
        f"{args.loader_images} photos {photo_w}x{photo_h} -> {args.resolution} buckets":
            data.assign_buckets(data.scan(str(photos)).records, args.resolution),
        f"{args.loader_images} small images (upscaled) -> {args.resolution} buckets": records[:args.loader_images],
    }
    out["loader"] = {}
    for label, subset in loader_sets.items():
        for workers in args.workers:
            rate, cpu_ms = _loader_rate(subset, args.batch_size, workers, tokenizer)
            out["loader"][f"{label}, workers={workers}"] = {"images_per_s": round(rate, 1),
                                                            "cpu_ms_per_image": round(cpu_ms, 1),
                                                            "load_average": round(os.getloadavg()[0], 2)}
            print(f"loader: {label}, batch {args.batch_size}, workers={workers}: {rate:.1f} images/s, "
                  f"{cpu_ms:.1f} CPU ms per image", flush=True)
    return out


def data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=100_000, help="small images generated for the scan")
    p.add_argument("--loader-images", type=int, default=512, help="images per DataLoader measurement")
    p.add_argument("--loader-size", default="1536x1024", help="size of the photo-like images the loader decodes")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cache", default="/tmp/sdtrainer-bench", help="where generated datasets are kept")


# name -> (help, add its arguments, run it and return the results)
SUBCOMMANDS = {"data": ("scan and DataLoader speed on CPU", data_args, cmd_data)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--json", help="also write the results to this JSON file")
        add_args(p)
    args = parser.parse_args(argv)

    results = {"command": "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                          f"Python {platform.python_version()}",
               **SUBCOMMANDS[args.command][2](args)}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
