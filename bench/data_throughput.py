#!/usr/bin/env python
"""Images/s of the shard stream per loader worker, beside the ceilings measured in the same run.

    source /tmp/s3-test/env.sh   # tests/services/s3_up.sh; without it the S3 rows are skipped
    python bench/data_throughput.py [--repeats 3] [--workers 1 2]

For 32² PNG and 256² JPEG shards, on local disk and on the local S3 server:
- raw read: shard bytes fetched and split into tar members, nothing decoded (I/O ceiling);
- decode only: PIL decoding of in-memory sample bytes in one process (decode ceiling);
- decode + into a batch: the same plus the copy into a uint8 [C, H, W] batch slot, all a loader
  worker does per image (the device scales and flips);
- stream: ShardStream batches with N loader workers, reported per worker.
Each number is the median of --repeats runs. The goal: stream per worker ≥ 80% of
decode only, i.e. decoding, not our code, is the bottleneck.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
import uuid

import numpy as np
import torch
from PIL import Image


from ddpm_dist.config import DataConfig
from ddpm_dist.data import build_stream, fs
from ddpm_dist.data.convert import make_shards
from ddpm_dist.data.digits import load_digits_images
from ddpm_dist.data.shards import decode, read_images
from ddpm_dist.data.stream import put_image

CASES = {"32² PNG": (32, "png", 2000), "256² JPEG": (256, "jpg", 600)}


class SyntheticSource:
    """Digits upscaled with mild noise: photo-like compressibility at any size."""

    def __init__(self, res: int, n: int):
        digits = load_digits_images(res)[:n].permute(0, 2, 3, 1).numpy().astype(np.int16)
        noise = np.random.default_rng(0).integers(-12, 13, digits.shape, dtype=np.int16)
        self.images = np.clip(digits + noise, 0, 255).astype(np.uint8)

    def ids(self):
        return [str(i) for i in range(len(self.images))]

    def open(self, sid):
        return Image.fromarray(self.images[int(sid)])


def write(url: str, res: int, fmt: str, n: int) -> dict:
    params = {"source": "bench", "input": "", "resolution": res, "format": fmt, "quality": 90,
              "seed": 0}
    return make_shards(SyntheticSource(res, n), url, params=params, max_samples=200,
                       workers=2, progress=False)


def raw_rate(url: str, index: dict) -> float:
    t0, n = time.perf_counter(), 0
    for shard in index["shards"]:
        n += len(read_images(fs.read_bytes(fs.join(url, shard["name"])), shard["name"])[0])
    return n / (time.perf_counter() - t0)


def decode_rate(url: str, index: dict, res: int) -> float:
    samples = [b for shard in index["shards"]
               for _, b in read_images(fs.read_bytes(fs.join(url, shard["name"])), "")[0]]
    t0 = time.perf_counter()
    for b in samples:
        decode(b, res)
    return len(samples) / (time.perf_counter() - t0)


def convert_rate(url: str, index: dict, res: int) -> float:
    """Decoding plus the copy into a uint8 batch slot that a loader worker does: the work floor."""
    samples = [b for shard in index["shards"]
               for _, b in read_images(fs.read_bytes(fs.join(url, shard["name"])), "")[0]]
    slot = torch.empty(3, res, res, dtype=torch.uint8)
    t0 = time.perf_counter()
    for b in samples:
        put_image(slot, decode(b, res))
    return len(samples) / (time.perf_counter() - t0)


def stream_rate(url: str, res: int, workers: int, batches: int = 20, batch: int = 32) -> float:
    """Steady state: the clock starts after the first batch (worker start-up excluded)."""
    it = iter(build_stream(DataConfig(source=url, num_workers=workers), batch, resolution=res))
    next(it)
    t0 = time.perf_counter()
    for _ in itertools.islice(it, batches):
        pass
    return batches * batch / (time.perf_counter() - t0) / max(workers, 1)


def bench(url: str, res: int, fmt: str, n: int, args) -> list[float]:
    index = write(url, res, fmt, n)
    med = lambda f: statistics.median(f() for _ in range(args.repeats))  # noqa: E731
    row = [med(lambda: raw_rate(url, index)), med(lambda: decode_rate(url, index, res)),
           med(lambda: convert_rate(url, index, res))]
    batches = max(4, n // 32 // 2 - 2)
    row += [med(lambda w=w: stream_rate(url, res, w, batches)) for w in args.workers]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    torch.set_num_threads(1)  # as a training rank would (OMP_NUM_THREADS=1); no pool contention
    stores = {"local": tempfile.mkdtemp(prefix="bench-shards-")}
    if os.environ.get("S3_TEST_BUCKET"):
        stores["S3 (local SeaweedFS)"] = f"s3://{os.environ['S3_TEST_BUCKET']}/bench-{uuid.uuid4().hex[:6]}"
    cols = ["raw tar read", "decode only (PIL, 1 proc)", "decode + into a batch (1 proc)"] + [f"stream, {w} worker(s), per worker"
                                                            for w in args.workers]
    print("| data | store | " + " | ".join(cols) + " | 1 worker / decode | 1 worker / decode+batch |")
    print("|" + " --- |" * (len(cols) + 4))
    for (name, (res, fmt, n)), (store, base) in itertools.product(CASES.items(), stores.items()):
        row = bench(f"{base}/{res}-{fmt}", res, fmt, n, args)
        cells = " | ".join(f"{v:,.0f}" for v in row)
        print(f"| {name} | {store} | {cells} | {row[3] / row[1]:.0%} | {row[3] / row[2]:.0%} |",
              flush=True)


if __name__ == "__main__":
    main()
