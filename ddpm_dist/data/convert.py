"""Converting a source into shards + index.json (the library behind tools/make_shards.py): all
shard writing is here, as all reading is in data/shards.py (which also describes the format).

Samples are shuffled once with a seed, encoded in worker processes (at most READ_AHEAD chunks
per worker in flight, so memory stays bounded; a worker that dies stops the run with a
DataError), packed into shards in order, and each shard is written whole (fsynced temp file +
rename, mode from the user's umask, or one S3 PUT), then its sample index (`.idx`, see
data/shards.py); tars are written deterministically (fixed
mtime/owner), so the same input gives the same bytes. index.json is
rewritten after every shard with `complete: false`, and with `complete: true` at the end, so
an interrupted run can be resumed: a rerun with the same parameters keeps the shards that
exist with the recorded checksum and re-encodes only from the first missing or bad one; other
parameters or other input content (ids and sizes, see `sources.fingerprint`) rewrite every shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from PIL import Image
from tqdm import tqdm

from ddpm_dist.data import fs
from ddpm_dist.data.shards import OversizedImage, centre_crop_resize, check_side, sample_index_bytes, sha256
from ddpm_dist.data.sources import open_source

log = logging.getLogger(__name__)
_JOB: dict = {}  # the source and encoding options, inherited by forked workers
CHUNK = 32       # samples per task sent to a worker
READ_AHEAD = 4   # tasks in flight per worker


PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def encode(img: Image.Image, *, resolution: int | None, fmt: str, quality: int) -> bytes:
    img = img.convert("RGB")
    if resolution:
        img = centre_crop_resize(img, resolution)
    buf = io.BytesIO()
    options = {"quality": quality} if fmt in ("jpg", "webp") else {}
    img.save(buf, format=PIL_FORMATS[fmt], **options)
    return buf.getvalue()


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A tar with fixed metadata: identical members give identical bytes (stable checksums)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample_records(data: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, size, sha256 digest) of each sample of a tar from `tar_bytes`: the members that
    share a key, from the first one's header to the end of the last one's padded data."""
    spans: list[list] = []  # [key, start, end]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            key = member.name.rpartition(".")[0]
            if spans and spans[-1][0] == key:
                spans[-1][2] = end
            else:
                spans.append([key, member.offset, end])
    return [(a, b - a, hashlib.sha256(data[a:b]).digest()) for _, a, b in spans]


def pack(samples: Iterable[tuple[str, str, bytes]], *, max_samples: int,
         max_bytes: int) -> Iterator[list[tuple[str, str, bytes]]]:
    """Group (key, id, image bytes) into shards of at most max_samples / about max_bytes."""
    group, size = [], 0
    for sample in samples:
        if group and (len(group) >= max_samples or size + len(sample[2]) > max_bytes):
            yield group
            group, size = [], 0
        group.append(sample)
        size += len(sample[2]) + 1536  # two tar headers and padding
    if group:
        yield group


def shard_members(group: list[tuple[str, str, bytes]], fmt: str) -> Iterator[tuple[str, bytes]]:
    for key, sid, data in group:
        yield f"{key}.{fmt}", data
        yield f"{key}.id", sid.encode()


def load_bounded(source, sid: str, resolution: int) -> Image.Image:
    """Record `sid` as RGB. One whose header claims a side over `max_side(resolution)` (a small
    file can claim a huge image) raises OversizedImage before its pixels are decoded, as the
    training loader refuses such a sample in a shard."""
    with source.open(sid) as img:
        check_side(img, resolution)
        return img.convert("RGB")


def _encode_one(item: tuple[int, str]) -> tuple[str, str, bytes | str]:
    """(key, id, the encoded image, or why the record is skipped)."""
    pos, sid = item
    try:
        img = load_bounded(_JOB["source"], sid, _JOB["resolution"])
    except (FileNotFoundError, PermissionError):
        raise  # the input is unreadable, not one record: an error
    except OversizedImage as e:
        return f"{pos:09d}", sid, str(e)
    except (OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError):
        return f"{pos:09d}", sid, "not a decodable image"  # PIL's errors for bytes that are not a (whole) image
    return f"{pos:09d}", sid, encode(img, **_JOB["options"])


class _SkipCounter:
    """Drops undecodable or oversized records, naming each; stops once they exceed `max_fraction`
    of `total`."""

    def __init__(self, total: int, max_fraction: float):
        self.total, self.max_fraction, self.skipped, self.first = total, max_fraction, 0, []

    def filter(self, samples: Iterator[tuple[str, str, bytes | str]]) -> Iterator[tuple[str, str, bytes]]:
        for key, sid, data in samples:
            if isinstance(data, bytes):
                yield key, sid, data
                continue
            self.skipped += 1
            self.first = (self.first + [sid])[:3]
            log.warning("skipping record %s: %s", sid, data)
            if self.skipped > self.max_fraction * self.total:
                raise fs.DataError(f"{self.skipped} undecodable records of {self.total} (more than "
                                   f"--max-skip-fraction {self.max_fraction}), first: {', '.join(self.first)}; "
                                   f"is the input damaged?")


def _encode_chunk(items: list[tuple[int, str]]) -> list[tuple[str, str, bytes]]:
    return [_encode_one(item) for item in items]


def _chunk_result(future: Future) -> list[tuple[str, str, bytes]]:
    try:
        return future.result()
    except BrokenProcessPool:
        raise fs.DataError("an encoding worker process died (killed, or out of memory?); "
                           "rerun the same command to resume from the last written shard") from None


def _encoded(items: list[tuple[int, str]], workers: int) -> Iterator[tuple[str, str, bytes]]:
    """Encoded samples in the order of `items`; with workers > 1 from forked processes, at most
    workers * READ_AHEAD chunks ahead of the consumer."""
    if workers <= 1:
        yield from map(_encode_one, items)
        return
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
    pending: deque[Future] = deque()
    try:
        for k in range(0, len(items), CHUNK):
            pending.append(pool.submit(_encode_chunk, items[k:k + CHUNK]))
            if len(pending) >= workers * READ_AHEAD:
                yield from _chunk_result(pending.popleft())
        while pending:
            yield from _chunk_result(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _verified_prefix(out: str, params: dict, endpoint: str | None) -> list[dict]:
    """Shards of a previous run with the same parameters that still match their checksums."""
    index_url = fs.join(out, "index.json")
    if not fs.exists(index_url, endpoint=endpoint):
        return []
    old = json.loads(fs.read_bytes(index_url, endpoint=endpoint, retries=2))
    if old.get("params") != params:
        log.warning("%s was written with other parameters; rewriting all shards", index_url)
        return []
    kept = []
    for shard in old["shards"]:
        url = fs.join(out, shard["name"])
        if not fs.exists(url, endpoint=endpoint) or \
                sha256(fs.read_bytes(url, endpoint=endpoint, retries=2)) != shard["sha256"]:
            break
        if "sample_index" not in shard or not fs.exists(fs.join(out, shard["sample_index"]), endpoint=endpoint):
            break  # written before sample indexes: rewritten, so that streams can read it by ranges
        kept.append(shard)
    return kept


def _write_index(out: str, shards: list[dict], params: dict, complete: bool,
                 endpoint: str | None) -> dict:
    index = {"format": "webdataset", "resolution": params["resolution"],
             "image_format": params["format"], "complete": complete,
             "total": sum(s["samples"] for s in shards), "skipped": sum(s.get("skipped", 0) for s in shards),
             "shards": shards, "params": params}
    fs.write_bytes(fs.join(out, "index.json"), json.dumps(index, indent=1).encode(),
                   endpoint=endpoint)
    return index


def make_shards(source, out: str, *, params: dict, max_samples: int = 1000,
                max_bytes: int = 64 << 20, workers: int = 0, endpoint: str | None = None,
                progress: bool = True, max_skip_fraction: float = 0.01, plan_streams: int = 0) -> dict:
    """Write `source` as shards under `out` (folder or s3:// URL); returns the index.

    `params` holds what determines the bytes: resolution, format, quality, seed (+ source).
    Records that do not decode are skipped and counted (each shard's `skipped`); more than
    `max_skip_fraction` of all stop the conversion with a DataError. `plan_streams` (the
    training's ranks x loader workers; 0: no plan) caps the samples per shard so that there
    are at least that many shards where the data allows, and warns where it does not.
    """
    ids = source.ids()
    if not ids:
        raise ValueError("the source holds no images")
    if plan_streams:
        max_samples = min(max_samples, max(1, len(ids) // plan_streams))
    fs.remove_temp_files(out)
    order = np.random.default_rng(params["seed"]).permutation(len(ids))
    shards = _verified_prefix(out, params, endpoint)
    start = sum(s["samples"] + s.get("skipped", 0) for s in shards)
    if shards:
        log.info("keeping %d verified shards (%d samples)", len(shards), start)
    _JOB.update(source=source, resolution=params["resolution"],
                options={"resolution": params["resolution"], "fmt": params["format"], "quality": params["quality"]})
    items = [(pos, ids[i]) for pos, i in enumerate(order)][start:]
    bar = tqdm(total=len(ids), initial=start, unit="img", disable=not progress)
    bad, counted = _SkipCounter(len(ids), max_skip_fraction), 0
    for group in pack(bad.filter(_encoded(items, workers)), max_samples=max_samples, max_bytes=max_bytes):
        name = f"shard-{len(shards):06d}.tar"
        data = tar_bytes(shard_members(group, params["format"]))
        fs.write_bytes(fs.join(out, name), data, endpoint=endpoint)
        fs.write_bytes(fs.join(out, name + ".idx"), sample_index_bytes(sample_records(data)), endpoint=endpoint)
        shards.append({"name": name, "samples": len(group), "bytes": len(data),
                       "sha256": sha256(data), "sample_index": name + ".idx"})
        if bad.skipped > counted:  # the records skipped before the next shard's first sample
            shards[-1]["skipped"], counted = bad.skipped - counted, bad.skipped
        _write_index(out, shards, params, False, endpoint)
        bar.update(len(group))
    bar.close()
    if len(shards) < plan_streams:
        log.warning("%d shards for %d planned streams (ranks x loader workers): streams will share shards "
                    "by sample ranges", len(shards), plan_streams)
    return _write_index(out, shards, params, True, endpoint)


def convert_source(kind: str, input_path: str | None, out: str, *, resolution: int | None = None,
                   image_format: str = "png", quality: int = 95, seed: int = 0, split: str = "train",
                   **options) -> dict:
    """Shards of a source (`open_source` kinds) under `out`: `make_shards` with the params that
    determine the bytes, which a rerun compares to skip verified shards. `options` go to
    make_shards (max_samples, workers, endpoint, progress, ...). The source's content
    fingerprint (ids and sizes), not its path, tells a rerun whether old shards are its own."""
    source = open_source(kind, input_path, resolution, split)
    params = {"source": kind, "content": source.fingerprint(),
              "resolution": resolution or _native_resolution(source), "format": image_format,
              "quality": quality, "seed": seed,
              **({"split": split} if split != "train" else {})}  # train sets keep their old params
    return make_shards(source, out, params=params, **options)


def _native_resolution(source) -> int:
    """Without a resolution the images keep their size; index.json records the first one's."""
    ids = source.ids()
    if not ids:
        raise ValueError("the source holds no images")
    with source.open(ids[0]) as img:  # the header only
        w, h = img.size
    if w != h:
        raise ValueError("images are not square; pass --resolution")
    return w
