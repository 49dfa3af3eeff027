"""Write WebDataset tar shards + index.json from an image folder, CIFAR-10, LSUN lmdb or digits.

    python tools/make_shards.py --source cifar10 --input cifar-10-batches-py \
        --out s3://bucket/cifar10/ --format png
    python tools/make_shards.py --source lsun --input bedroom_train_lmdb --resolution 256 \
        --format jpg --quality 95 --out s3://bucket/lsun-bedroom-256/ --workers 8

--plan-world-size W --plan-workers K sizes shards so that the W ranks x K loader workers of the
planned training have a shard each where the data allows (fewer shards than that are shared by
sample ranges). S3 endpoint and credentials come from the AWS environment (AWS_ENDPOINT_URL, ...) or
--s3-endpoint. A rerun with the same options skips shards already written and verified.
CIFAR-10's python batches are pickle files; they are read with an unpickler that admits numpy
arrays only, so a batch that names anything else is refused, not run.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ddpm_dist.data.convert import convert_source
from ddpm_dist.data.fs import DataError
from ddpm_dist.utils.urls import endpoint_error, location_error


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="cifar10: the python batches are pickle files, read with an unpickler that "
                                       "admits numpy arrays only: a batch naming anything else is refused.")
    p.add_argument("--source", required=True, choices=["folder", "cifar10", "lsun", "digits"])
    p.add_argument("--input", help="folder / cifar-10-batches-py / *_lmdb folder")
    p.add_argument("--split", default="train", choices=["train", "test"], help="cifar10: which split")
    p.add_argument("--out", required=True, help="local folder or s3://bucket/prefix/")
    p.add_argument("--max-samples", type=int, default=1000, help="samples per shard at most")
    p.add_argument("--max-bytes", type=int, default=64 << 20, help="bytes per shard, about")
    p.add_argument("--format", default="png", choices=["png", "jpg", "webp"])
    p.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    p.add_argument("--resolution", type=int, default=None,
                   help="centre-crop + resize to this size (DDPM LSUN preprocessing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    p.add_argument("--s3-endpoint", default=None, help="else AWS_ENDPOINT_URL")
    p.add_argument("--max-skip-fraction", type=float, default=0.01,
                   help="records that do not decode are skipped; more than this fraction of all stops the run")
    p.add_argument("--plan-world-size", type=int, default=None,
                   help="ranks of the planned training: with --plan-workers, at most samples / (ranks x workers) "
                        "samples per shard, so that every loader stream can have a shard of its own")
    p.add_argument("--plan-workers", type=int, default=None,
                   help="loader workers per rank of the planned training (data.num_workers, 0 counted as 1; "
                        "default 1)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Raise ValueError (one line) for settings no run can use."""
    message = location_error(args.out, "--out") or endpoint_error(args.s3_endpoint, "--s3-endpoint")
    if message:
        raise ValueError(message)
    for flag, value, least in (("--max-samples", args.max_samples, 1), ("--max-bytes", args.max_bytes, 1),
                               ("--workers", args.workers, 0), ("--resolution", args.resolution or 1, 1),
                               ("--plan-world-size", _or(args.plan_world_size, 1), 1),
                               ("--plan-workers", _or(args.plan_workers, 0), 0)):
        if value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    if not 0 <= args.max_skip_fraction < 1:
        raise ValueError(f"--max-skip-fraction must be in [0, 1), got {args.max_skip_fraction}")
    if not 1 <= args.quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {args.quality}")


def convert(args) -> dict:
    return convert_source(args.source, args.input, args.out, resolution=args.resolution, image_format=args.format,
                          quality=args.quality, seed=args.seed, split=args.split, max_samples=args.max_samples,
                          max_bytes=args.max_bytes, workers=args.workers, endpoint=args.s3_endpoint,
                          progress=not args.no_progress, max_skip_fraction=args.max_skip_fraction,
                          plan_streams=plan_streams(args))


def plan_streams(args) -> int:
    """The planned training's loader streams (ranks x workers), 0 without a plan."""
    if args.plan_world_size is None and args.plan_workers is None:
        return 0
    return _or(args.plan_world_size, 1) * max(_or(args.plan_workers, 1), 1)  # 0 workers: one stream


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        check_args(args)
        index = convert(args)
    except (DataError, ValueError, OSError) as exc:  # missing input, bad setting, unwritable --out
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {index['total']} samples in {len(index['shards'])} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
