"""The training stream over tar shards (local or s3://): split by rank and worker, resumable.

Why not webdataset's pipeline: its shard resampling and shuffle buffers draw seeds from
pid/time unless carefully configured, and a shuffle buffer's state cannot be checkpointed
cheaply. Here every choice is a pure function of (seed, epoch, stream, shard position), and we
read tars with `tarfile` (which also lets us reject unsafe members and salvage truncated
shards), so a position is just two integers per stream:

- Epoch e permutes the shard list with (seed, e). Shards go to ranks round-robin, then to the
  rank's loader workers round-robin: stream s = rank + world_size * worker owns
  perm[s::world_size * workers] (disjoint across ranks and workers).
- Each stream yields the same number of batches per epoch, total // (streams * B); a stream
  that runs out of its own shards resamples them with (seed, e, s, position). Hence every rank
  yields the same number of batches and no rank waits at an epoch end.
- Fewer shards than streams (CIFAR-10's 50 shards on 512 ranks x 8 workers): streams share
  shards by sample ranges instead (`Plan.by_ranges`, when every shard has the sample index
  make_shards writes beside it). The epoch's shard order, rotated by a seeded offset, is cut
  into one range of total // streams samples per stream; a stream reads only its range's bytes
  (ranged GETs; each sample checked against its own sha256), so every sample is read and seen
  once an epoch but for fewer than one batch per stream. Position p > 0 of a stream is the
  range of stream s + p, read only to replace skipped samples.
- A shard is read whole (retried as a unit on I/O errors, checksummed against index.json)
  and its samples are visited in a permutation seeded by (seed, e, s, position) - a full
  in-shard shuffle, with no shuffle buffer. Flips use the same generator; a batch carries
  them as flags (ImageBatch) and the device applies them.
- Bad data ends the run instead of looping: a shard whose bytes differ from index.json is
  not used (its samples count as skipped), undecodable samples are skipped, one warning per
  shard read says how many; a shard with no decodable sample, or skipped samples above
  data.max_skip_fraction of what the stream has read (once it has read MIN_READ_FOR_SKIP_LIMIT),
  raise a BadDataError. The next read (the next epoch's first at an epoch's last) is made
  ahead in a daemon thread, which closing the stream abandons (exit never waits for it).
- A stream's cursor is (position: shard or range, slot in the permutation). Loader workers send it with
  each batch; the stream keeps the latest per worker, so state_dict() is exact even though
  workers prefetch. DataLoader takes workers round-robin, which makes the batch order a
  function of the cursors too; on resume the worker ids are rotated to continue it.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ddpm_dist.data import fs
from ddpm_dist.data.batch import ImageBatch
from ddpm_dist.data.shards import PIL_MODES, ShardRead, decode, read_index, read_samples_at, read_shard_at
from ddpm_dist.distributed import rank_split
from ddpm_dist.utils.seeds import numpy_rng

log = logging.getLogger(__name__)

MIN_READ_FOR_SKIP_LIMIT = 1000  # samples a stream reads before data.max_skip_fraction applies


@dataclass(frozen=True)
class Plan:
    """What every worker needs to produce its batches; small and picklable."""
    base: str
    shards: tuple[tuple[str, int, str], ...]  # (name, samples, sha256)
    resolution: int
    channels: int  # 1: decoded to grey ("L"), 3: to RGB
    batch_size: int
    rank: int
    world_size: int
    workers: int  # loader workers per rank (0 → in-process, counted as 1 stream)
    seed: int
    flip: bool
    endpoint: str | None
    retries: int
    retry_wait: float
    max_skip_fraction: float = 0.01
    ranges: tuple[tuple[str, int], ...] = ()  # per shard (sample index name, bytes); () if any lacks one

    @property
    def streams(self) -> int:
        return self.world_size * max(self.workers, 1)

    @property
    def batches_per_stream(self) -> int:
        total = sum(n for _, n, _ in self.shards)
        return max(1, total // self.streams // self.batch_size)

    def rng(self, *key: int) -> np.random.Generator:
        return numpy_rng(self.seed, *key)

    @property
    def by_ranges(self) -> bool:
        """Fewer shards than streams, all with a sample index: streams read sample ranges."""
        return len(self.shards) < self.streams and len(self.ranges) == len(self.shards) and \
            sum(n for _, n, _ in self.shards) > 0

    @property
    def range_size(self) -> int:
        """Samples in one stream's range of an epoch (by_ranges)."""
        return max(1, sum(n for _, n, _ in self.shards) // self.streams)

    def own_reads(self, epoch: int, stream: int) -> int:
        """Reads (whole shards, or one range) that a stream owns in an epoch."""
        return 1 if self.by_ranges else len(rank_split(self.rng(epoch).permutation(len(self.shards)),
                                                       stream, self.streams))

    def next_read(self, epoch: int, stream: int, position: int) -> tuple[int, int]:
        """(epoch, position) of the read most likely to follow the one at `position`: the next
        own one, else the next epoch's first (more is read only to replace skipped samples)."""
        if position + 1 < self.own_reads(epoch, stream):
            return epoch, position + 1
        return epoch + 1, 0

    def shard_at(self, epoch: int, stream: int, position: int) -> int:
        """The shard a stream reads at a position: its own ones, then seeded resamples."""
        perm = self.rng(epoch).permutation(len(self.shards))
        own = rank_split(perm, stream, self.streams)
        if position < len(own):
            return int(own[position])
        pool = own if len(own) else perm  # fewer shards than streams: draw from all
        return int(pool[self.rng(epoch, stream, position).integers(len(pool))])

    def range_at(self, epoch: int, stream: int, position: int) -> list[tuple[int, int, int]]:
        """(shard, first sample, end) pieces of the samples a stream reads at a position
        (by_ranges). The epoch's shard order, rotated by a seeded offset, is cut into
        `streams` ranges of `range_size` samples, range s for stream s; the samples past the
        last range wait for another epoch. Position p > 0 (a stream that skipped damaged
        samples needs more) takes the range of stream s + p."""
        perm, starts, rotation = _epoch_order(self, epoch)
        total, size = int(starts[-1]), self.range_size
        at, need, pieces = (rotation + ((stream + position) % self.streams) * size) % total, size, []
        while need > 0:
            j = int(np.searchsorted(starts, at, side="right")) - 1
            lo = at - int(starts[j])
            take = min(need, int(starts[j + 1]) - at)
            pieces.append((int(perm[j]), lo, lo + take))
            need, at = need - take, (at + take) % total
        return pieces


@functools.lru_cache(maxsize=4)
def _epoch_order(plan: Plan, epoch: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The epoch's shard order (the whole-shard order too), the first sample of each shard in
    it, and the seeded rotation of the sample ranges."""
    rng = plan.rng(epoch)
    perm = rng.permutation(len(plan.shards))
    starts = np.concatenate([[0], np.cumsum([plan.shards[i][1] for i in perm])])
    return perm, starts, int(rng.integers(max(int(starts[-1]), 1)))


def read_shard(plan: Plan, index: int, cancel: threading.Event | None = None) -> ShardRead:
    """Shard `index` of the plan, read with its retries (`read_shard_at`)."""
    name, count, checksum = plan.shards[index]
    return read_shard_at(fs.join(plan.base, name), count, checksum, endpoint=plan.endpoint,
                         retries=plan.retries, wait=plan.retry_wait, cancel=cancel)


def read_at(plan: Plan, epoch: int, stream: int, position: int,
            cancel: threading.Event | None = None) -> ShardRead:
    """What a stream reads at a position: a whole shard, or its range's samples by ranges."""
    if not plan.by_ranges:
        return read_shard(plan, plan.shard_at(epoch, stream, position), cancel)
    parts = []
    for shard, lo, hi in plan.range_at(epoch, stream, position):
        name, (index_name, size) = plan.shards[shard][0], plan.ranges[shard]
        parts.append(read_samples_at(fs.join(plan.base, name), fs.join(plan.base, index_name), lo, hi, size,
                                     endpoint=plan.endpoint, retries=plan.retries, wait=plan.retry_wait,
                                     cancel=cancel))
    return ShardRead(", ".join(p.url for p in parts), [im for p in parts for im in p.images],
                     sum(p.missing for p in parts), "; ".join(p.problem for p in parts if p.problem))


@dataclass
class SkipTally:
    """What one stream has read and skipped so far, to stop it when too much is bad."""
    limit: float
    read: int = 0
    skipped: int = 0
    by_shard: dict[str, int] = field(default_factory=dict)

    def add(self, url: str, read: int, skipped: int) -> None:
        self.read, self.skipped = self.read + read, self.skipped + skipped
        if skipped:
            self.by_shard[url] = self.by_shard.get(url, 0) + skipped
        if self.read >= MIN_READ_FOR_SKIP_LIMIT and self.skipped > self.limit * self.read:
            raise fs.BadDataError(self.message())

    def message(self) -> str:
        worst = sorted(self.by_shard.items(), key=lambda kv: -kv[1])
        names = ", ".join(f"{url} ({n})" for url, n in worst[:5])
        more = f" and {len(worst) - 5} more shards" if len(worst) > 5 else ""
        return (f"{self.skipped} of {self.read} samples read were skipped "
                f"({self.skipped / self.read:.1%} > data.max_skip_fraction {self.limit:g}): "
                f"{names}{more}")


class ShardReader:
    """One stream's reads, each in a daemon thread (interpreter exit never waits for it), with
    the likely next one (`Plan.next_read`) fetched ahead while the current one is decoded, across
    epoch ends too when the reader outlives an epoch (a loader worker's does). close() ends the
    retry waits of the reads in flight and drops the read-ahead."""

    def __init__(self, plan: Plan, stream: int, ahead: bool = True):
        self.plan, self.stream, self.ahead = plan, stream, ahead
        self.cancel = threading.Event()
        self.upcoming: tuple[tuple[int, int], Future] | None = None

    def read(self, epoch: int, position: int) -> ShardRead:
        key = (epoch, position)
        if self.upcoming and self.upcoming[0] == key:
            shard = self.upcoming[1].result()
        else:  # not read ahead: read now, in this thread
            shard = read_at(self.plan, epoch, self.stream, position, self.cancel)
        following = self.plan.next_read(epoch, self.stream, position)
        if self.ahead and not (self.upcoming and self.upcoming[0] == following):
            self.upcoming = following, self._start(following)
        return shard

    def _start(self, key: tuple[int, int]) -> Future:
        future: Future = Future()
        cancel = self.cancel

        def run():
            try:
                future.set_result(read_at(self.plan, key[0], self.stream, key[1], cancel))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever takes the result
                future.set_exception(exc)

        threading.Thread(target=run, name="shard-prefetch", daemon=True).start()
        return future

    def close(self) -> None:
        self.cancel.set()
        self.cancel, self.upcoming = threading.Event(), None


def stream_samples(plan: Plan, epoch: int, stream: int, cursor: tuple[int, int],
                   tally: SkipTally, reader: ShardReader | None = None):
    """Endless (image or None if corrupt, its flip, skipped-count, cursor after it) from a
    cursor on. Without a `reader` the reads are made in turn, none ahead."""
    position, slot = cursor
    empty_run = 0
    own = reader is None
    reader = reader or ShardReader(plan, stream, ahead=False)
    try:
        while True:
            shard = reader.read(epoch, position)
            yield from _shard_samples(plan, epoch, stream, position, slot, shard, tally)
            empty_run = empty_run + 1 if not shard.images else 0
            if empty_run > 2 * (plan.streams if plan.by_ranges else len(plan.shards)):
                raise fs.BadDataError(f"{plan.base}: no usable samples in any shard")
            position, slot = position + 1, 0
    finally:
        if own:
            reader.close()


def _shard_samples(plan: Plan, epoch: int, stream: int, position: int, slot: int,
                   shard: ShardRead, tally: SkipTally):
    """The samples of the shard at `position` from `slot` on, in their seeded order; one
    warning at its end if any were skipped."""
    images = shard.images
    rng = plan.rng(epoch, stream, position, 1)
    order, flips = rng.permutation(len(images)), rng.random(len(images)) < 0.5
    missing = shard.missing if slot == 0 else 0  # counted once, on first visit of the shard
    tally.add(shard.url, missing, missing)
    corrupt = 0
    for k in range(slot, len(images)):
        image = _decode_or_none(images[order[k]], plan)
        corrupt += image is None
        tally.add(shard.url, 1, int(image is None))
        yield image, plan.flip and bool(flips[k]), missing + (image is None), (position, k + 1)
        missing = 0
    _check_shard(shard, slot, corrupt)
    if missing:
        yield None, False, missing, (position + 1, 0)


def _check_shard(shard: ShardRead, slot: int, corrupt: int) -> None:
    """Warn once for the shard's skipped samples; a shard where nothing decodes is an error."""
    if slot == 0 and not shard.problem and corrupt == len(shard.images):
        raise fs.BadDataError(f"{shard.url}: no decodable sample among its {len(shard.images)} "
                              f"images (rewrite it with make_shards)")
    reasons = [shard.problem] if shard.problem else []
    if corrupt:
        reasons.append(f"{corrupt} corrupt sample{'s' if corrupt > 1 else ''}")
    if shard.missing and not shard.problem and slot == 0:
        reasons.append(f"{shard.missing} missing or unsafe")
    if reasons:
        missing = shard.missing if slot == 0 else 0
        log.warning("%s: skipped %d of %d samples (%s)", shard.url, corrupt + missing,
                    max(len(shard.images) - slot, 0) + missing, "; ".join(reasons))


def _decode_or_none(data: bytes, plan: Plan) -> np.ndarray | None:
    try:
        return decode(data, plan.resolution, plan.channels)
    except Exception:  # noqa: BLE001 - any undecodable sample is skipped (counted, not fatal)
        return None


class _RankDataset(IterableDataset):
    """One rank's data, one epoch per iteration: each loader worker runs one stream.

    The first iteration continues from the given position; each later one is the next epoch
    from its start. Persistent workers keep their own copy, so they advance in step.
    """

    def __init__(self, plan: Plan, epoch: int, batch: int, cursors: list[tuple[int, int]]):
        self.plan, self.epoch, self.batch, self.cursors = plan, epoch, batch, cursors
        self.started = False
        self.tally = SkipTally(plan.max_skip_fraction)  # over all epochs of this worker
        self.reader: ShardReader | None = None  # kept across epochs: it reads the next one ahead

    def __iter__(self):
        info = get_worker_info()
        nw = max(self.plan.workers, 1)
        if self.started:
            self.epoch, self.batch, self.cursors = self.epoch + 1, 0, [(0, 0)] * nw
        self.started = True
        worker = ((info.id if info else 0) + self.batch) % nw  # rotation continues the order
        done = self.batch // nw + (worker < self.batch % nw)
        remaining = self.plan.batches_per_stream - done
        stream = self.plan.rank + self.plan.world_size * worker
        if self.reader is None or self.reader.stream != stream:  # a resumed epoch rotates workers
            self.reader = ShardReader(self.plan, stream)
        samples = stream_samples(self.plan, self.epoch, stream, tuple(self.cursors[worker]),
                                 self.tally, self.reader)
        finished = False
        try:
            for _ in range(remaining):
                yield (*_next_batch(samples, self.plan), worker)
            finished = True
        finally:
            samples.close()
            if not finished:  # the stream is closed: abandon the read ahead
                self.reader.close()


def put_image(slot: torch.Tensor, image: np.ndarray) -> None:
    """uint8 [R, R, C] → the uint8 [C, R, R] slot of a batch, per image while it is in cache."""
    slot.copy_(torch.from_numpy(image).permute(2, 0, 1))


def _next_batch(samples, plan: Plan):
    """(ImageBatch, samples skipped meanwhile, cursor after the batch).

    Built in the loader worker, off the training process: decoded pixels and flip flags only,
    the device does the rest (ddpm_dist.data.batch.to_model_input).
    """
    images = torch.empty(plan.batch_size, plan.channels, plan.resolution, plan.resolution,
                         dtype=torch.uint8)
    flips = torch.zeros(plan.batch_size, dtype=torch.bool)
    n = skipped = 0
    while n < plan.batch_size:
        image, flip, sk, cursor = next(samples)
        skipped += sk
        if image is not None:
            put_image(images[n], image)
            flips[n] = flip
            n += 1
    return ImageBatch(images, flips), skipped, cursor


def _one_line_errors(batches):
    """A DataError from a loader worker arrives wrapped in its traceback text: keep the line."""
    try:
        yield from batches
    except fs.DataError as exc:
        kind = type(exc)
        line = str(exc).strip().splitlines()[-1]
        raise kind(line.removeprefix(f"{kind.__module__}.{kind.__name__}: ")) from None


def ignore_stop_signals(main_pid: int, worker_id: int) -> None:
    """In each loader worker: leave stop signals to the main process, which stops the workers
    itself. Slurm's --signal, scancel and Ctrl-C reach the whole process group; a worker killed
    by one would end the run with "DataLoader worker exited unexpectedly" instead of a
    checkpoint. A SIGTERM from the main process itself (multiprocessing's shutdown of its
    workers at exit) still ends the worker: a thread waits for SIGTERM and reads who sent it.
    Orphaned workers still exit: DataLoader's watchdog ends them with their parent."""
    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    # Blocked here, before any other thread starts, so that only the waiting thread takes it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from, args=(main_pid,), daemon=True,
                     name="sigterm-from-main").start()


def _exit_on_sigterm_from(main_pid: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main_pid:
        pass
    os._exit(128 + signal.SIGTERM)


class ShardStream:
    """Endless batches for one rank from shards under a folder or s3:// URL with index.json.

    The same interface as MemoryStream: iterate for ImageBatch (uint8 [B, C, R, R] and flips);
    state_dict()/load_state_dict() hold the position. `skipped` counts corrupt or missing
    samples so far (for TensorBoard). pin_memory: batches arrive in page-locked memory, so that
    the copy to a CUDA device is asynchronous.
    """

    def __init__(self, plan: Plan, pin_memory: bool = False):
        self.plan, self.pin_memory = plan, pin_memory
        nw = max(plan.workers, 1)
        self.epoch, self.batch, self.skipped = 0, 0, 0
        self.cursors = [(0, 0)] * nw
        self.batches_per_epoch = plan.batches_per_stream * nw
        if plan.by_ranges:
            log.info("%s: %d shards for %d streams: each stream reads a range of %d samples an epoch",
                     plan.base, len(plan.shards), plan.streams, plan.range_size)
        elif len(plan.shards) < plan.streams:
            log.warning("%s: %d shards for %d streams, without sample indexes (written by an older make_shards): "
                        "streams share whole shards; rewrite them with make_shards to read them by ranges",
                        plan.base, len(plan.shards), plan.streams)

    def _loader(self) -> DataLoader:
        ds = _RankDataset(self.plan, self.epoch, self.batch, list(self.cursors))
        # Forked workers would inherit the parent's S3 client and its open connections, whose
        # clean-up in the child broke the parent's (a hang); forkserver workers start clean,
        # and persist across epochs so that their start-up (~2 s) is paid once.
        context = None
        if self.plan.workers and self.plan.base.startswith("s3://"):
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])  # workers fork with torch etc. imported
        return DataLoader(ds, batch_size=None, num_workers=self.plan.workers,
                          worker_init_fn=functools.partial(ignore_stop_signals, os.getpid()),
                          multiprocessing_context=context, persistent_workers=self.plan.workers > 0,
                          pin_memory=self.pin_memory)

    def __iter__(self) -> Iterator[ImageBatch]:
        loader = self._loader()
        while True:
            for batch, skipped, cursor, worker in _one_line_errors(loader):
                self.cursors[worker] = tuple(int(c) for c in cursor)
                self.skipped += int(skipped)
                self.batch += 1
                yield batch
            assert self.batch == self.batches_per_epoch, (self.batch, self.batches_per_epoch)
            self.epoch, self.batch = self.epoch + 1, 0
            self.cursors = [(0, 0)] * max(self.plan.workers, 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "streams": self.plan.streams,
                "by_ranges": self.plan.by_ranges, "cursors": [list(c) for c in self.cursors],
                "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.skipped = int(state.get("skipped", 0))
        saved = (state.get("streams"), bool(state.get("by_ranges", False)))
        if saved == (self.plan.streams, self.plan.by_ranges):
            self.cursors = [tuple(int(v) for v in c) for c in state["cursors"]]
        else:  # another world size, worker count or way of reading: the old cursors mean nothing here
            log.warning("data position saved with %s streams%s, now %d%s: restarting epoch %d",
                        saved[0], " by ranges" * saved[1], self.plan.streams,
                        " by ranges" * self.plan.by_ranges, self.epoch)
            self.batch, self.cursors = 0, [(0, 0)] * max(self.plan.workers, 1)


def open_shard_stream(url: str, *, batch_size: int, resolution: int, rank: int, world_size: int,
                      seed: int, data_cfg, channels: int = 3,
                      pin_memory: bool = False) -> ShardStream:
    """Read index.json (failing at once with one DataError line) and build the rank's stream of
    `channels`-channel images (1: grey, 3: RGB); pin_memory for a CUDA device."""
    if channels not in PIL_MODES:
        raise ValueError(f"shards decode to 1 (grey) or 3 (RGB) channels, not {channels}")
    index = read_index(url, endpoint=data_cfg.s3_endpoint)
    if index["resolution"] != resolution:
        log.warning("%s: shards are %d², model wants %d²: resizing while decoding", url,
                    index["resolution"], resolution)
    shards = tuple((s["name"], int(s["samples"]), s["sha256"]) for s in index["shards"])
    ranges = tuple((s["sample_index"], int(s["bytes"])) for s in index["shards"] if "sample_index" in s)
    plan = Plan(base=url.rstrip("/"), shards=shards, resolution=resolution, channels=channels,
                batch_size=batch_size, rank=rank, world_size=world_size, workers=data_cfg.num_workers, seed=seed,
                flip=data_cfg.flip, endpoint=data_cfg.s3_endpoint, retries=data_cfg.retries,
                retry_wait=data_cfg.retry_wait, max_skip_fraction=data_cfg.max_skip_fraction,
                ranges=ranges if len(ranges) == len(shards) else ())
    return ShardStream(plan, pin_memory)
