"""Fewer shards than streams: 512 ranks x 8 loader workers share a data set by sample ranges.

The simulation runs the real Plan and stream code of every (rank, worker) stream in this
process, one after another, over shards that make_shards wrote; only fs.read_bytes is wrapped,
to count the requests and bytes that reach the storage. The end-to-end tests run real
ShardStreams (and loader workers) on local and S3 shards.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import NoiseSource, keys, model_inputs, stream_for, write_noise_shards
from ddpm_dist.config import DataConfig
from ddpm_dist.data import fs, stream
from ddpm_dist.data.batch import to_model_range
from ddpm_dist.data.fs import DataError

W, K = 512, 8           # 64 nodes x 8 GPUs, 8 loader workers each: 4,096 streams
N, PER_SHARD, B = 8_400, 168, 2    # 50 shards, like CIFAR-10's 50,000 in shards of 1,000


class ReadLog:
    """Every fs.read_bytes call (the real read still runs): (url, bytes returned), thread-safe."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        real = fs.read_bytes

        def read_bytes(url, *args, **kw):
            data = real(url, *args, **kw)
            with self.lock:
                self.calls.append((url, len(data)))
            return data
        monkeypatch.setattr(fs, "read_bytes", read_bytes)

    def take(self) -> list[tuple[str, int]]:
        _join_read_threads()
        with self.lock:
            calls, self.calls = self.calls, []
        return calls


def _join_read_threads(timeout: float = 60) -> None:
    """Reads started in the background have finished (each is one bounded local read)."""
    for thread in threading.enumerate():
        if thread.name == "shard-prefetch":
            thread.join(timeout)


@pytest.fixture(scope="module")
def cifar_like():
    """The shards in memory where there is /dev/shm: make_shards fsyncs each of its 101 files."""
    import shutil
    import tempfile
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))
    yield write_noise_shards(root / "shards", n=N, res=8, max_samples=PER_SHARD)
    shutil.rmtree(root, ignore_errors=True)


def _pixel_index(n: int) -> dict[bytes, int]:
    """Sample index by its uint8 [R, R, 3] pixel bytes (NoiseSource's images are unique)."""
    return {im.tobytes(): i for i, im in enumerate(NoiseSource(n, 8).images)}


def _stream_epoch(plan, epoch: int, worker: int) -> list[np.ndarray]:
    """The images one (rank, worker) stream yields in an epoch, through the real stream code."""
    tally = stream.SkipTally(plan.max_skip_fraction)
    samples = stream.stream_samples(plan, epoch, plan.rank + plan.world_size * worker, (0, 0), tally)
    try:
        batches = [stream._next_batch(samples, plan)[0] for _ in range(plan.batches_per_stream)]
    finally:
        samples.close()
    return [im.permute(1, 2, 0).contiguous().numpy() for b in batches for im in b.images]


def test_4096_streams_over_50_shards_see_each_sample_once_reading_the_data_set_once(cifar_like, monkeypatch):
    """CIFAR-10 at 64 nodes: 50 shards, 4,096 streams. Streams used to draw two whole shards each
    at random (one of them a read-ahead thrown away): 8,192 whole-shard reads per epoch and
    about 37% of the images unseen."""
    index = json.loads((Path(cifar_like) / "index.json").read_text())
    data_bytes = sum(s["bytes"] for s in index["shards"])
    assert len(index["shards"]) == N // PER_SHARD < W * K
    base = stream.open_shard_stream(cifar_like, batch_size=B, resolution=8, rank=0, world_size=W, seed=3,
                                    data_cfg=DataConfig(source=cifar_like, num_workers=K)).plan
    assert base.by_ranges
    by_pixels, reads = _pixel_index(N), ReadLog(monkeypatch)
    seen, gets, batches = [], [], set()
    for rank in range(W):
        plan = dataclasses.replace(base, rank=rank)
        for worker in range(K):
            images = _stream_epoch(plan, 0, worker)
            batches.add(len(images) // B)
            seen += [by_pixels[im.tobytes()] for im in images]
            gets.append(reads.take())
            assert len(gets[-1]) <= 4, gets[-1]  # O(1) requests per stream
        read = sum(n for calls in gets for _, n in calls)
        assert read <= 1.5 * data_bytes, f"{read} bytes read by rank {rank} of {W}: data set {data_bytes}"
    per_stream = base.batches_per_stream * B
    remainder = N - W * K * per_stream  # dropped so that every stream yields the same batches
    assert batches == {base.batches_per_stream} and base.batches_per_stream >= 1
    assert remainder < W * K * B  # less than one batch per stream
    counts = Counter(seen)
    assert max(counts.values()) == 1, counts.most_common(3)  # no sample twice
    assert len(counts) == N - remainder  # every other sample once


def test_a_later_epoch_reorders_the_samples_and_still_sees_each_once(cifar_like):
    base = stream.open_shard_stream(cifar_like, batch_size=B, resolution=8, rank=0, world_size=W, seed=3,
                                    data_cfg=DataConfig(source=cifar_like, num_workers=K)).plan
    by_pixels = _pixel_index(N)
    epoch0, epoch1 = [], []
    for rank in range(0, W, 64):  # a sample of the ranks, all their workers
        plan = dataclasses.replace(base, rank=rank)
        for worker in range(K):
            epoch0.append([by_pixels[im.tobytes()] for im in _stream_epoch(plan, 0, worker)])
            epoch1.append([by_pixels[im.tobytes()] for im in _stream_epoch(plan, 1, worker)])
    flat1 = [i for s in epoch1 for i in s]
    assert len(set(flat1)) == len(flat1)
    assert epoch0 != epoch1 and set(i for s in epoch0 for i in s) != set(flat1)


# ---- real streams on shards written by make_shards ------------------------------------------------

def _epoch_keys(url: str, world: int, **kw) -> tuple[list[bytes], int]:
    """Every rank's first epoch as keys() of model inputs, and the samples they skipped."""
    seen, skipped = [], 0
    for rank in range(world):
        s = stream_for(url, rank=rank, world=world, batch=2, **kw)
        seen += [k for x in model_inputs(s, s.batches_per_epoch) for k in keys(x)]
        skipped += s.skipped
    return seen, skipped


def _source_keys(n: int) -> list[bytes]:
    images = torch.from_numpy(NoiseSource(n, 8).images).permute(0, 3, 1, 2)
    return keys(to_model_range(images))


def test_more_streams_than_shards_read_by_range_give_the_source_images_once(tmp_path, caplog):
    url = write_noise_shards(tmp_path / "s", n=48, max_samples=16)  # 3 shards, 8 streams
    with caplog.at_level(logging.WARNING):
        seen, skipped = _epoch_keys(url, 8)
    assert sorted(seen) == sorted(_source_keys(48)) and skipped == 0
    assert "older make_shards" not in caplog.text


def _sample_records(folder, shard: str) -> list[tuple[int, int]]:
    """(offset, size) of each sample of a shard, from the sample index make_shards wrote."""
    from ddpm_dist.data.shards import SAMPLE_INDEX_HEADER, read_sample_records
    index = json.loads((folder / "index.json").read_text())
    entry = next(s for s in index["shards"] if s["name"] == shard)
    data = (folder / entry["sample_index"]).read_bytes()
    return [(r.offset, r.size) for r in read_sample_records(data[SAMPLE_INDEX_HEADER:])]


def test_a_corrupted_byte_in_one_sample_is_skipped_and_counted(tmp_path, caplog):
    folder = tmp_path / "s"
    url = write_noise_shards(folder, n=48, max_samples=16)
    offset, size = _sample_records(folder, "shard-000001.tar")[5]
    path = folder / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[offset + 512 + 40] ^= 0xFF  # inside the sample's PNG
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        seen, skipped = _epoch_keys(url, 8)
    assert skipped == 1
    assert len(set(seen)) == 47 and set(seen) <= set(_source_keys(48))  # all but the damaged one
    assert "checksum" in caplog.text and "shard-000001.tar" in caplog.text


def _older_shards(folder) -> str:
    """48 noise samples in shards of 16 as an older make_shards wrote them: no sample indexes."""
    url = write_noise_shards(folder, n=48, max_samples=16)
    index = json.loads((folder / "index.json").read_text())
    for shard in index["shards"]:
        (folder / shard.pop("sample_index")).unlink()
    (folder / "index.json").write_text(json.dumps(index))
    return url


def test_shards_without_a_sample_index_share_whole_shards_with_one_warning(tmp_path, caplog):
    folder = tmp_path / "s"
    url = _older_shards(folder)
    with caplog.at_level(logging.WARNING):
        s = stream_for(url, rank=0, world=8, batch=2)
        assert len(model_inputs(s, s.batches_per_epoch)) == s.batches_per_epoch
    lines = [r.getMessage() for r in caplog.records if "make_shards" in r.getMessage()]
    assert len(lines) == 1 and "rewrite" in lines[0] and "\n" not in lines[0]


def test_a_rerun_of_make_shards_adds_the_sample_indexes_to_older_shards(tmp_path):
    folder = tmp_path / "s"
    url = _older_shards(folder)
    write_noise_shards(folder, n=48, max_samples=16)  # the same command again
    assert stream_for(url, rank=0, world=8, batch=2).plan.by_ranges
    assert sorted(p.name for p in folder.glob("*.idx")) == [f"shard-00000{i}.tar.idx" for i in range(3)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_by_ranges_continues_the_same_sample_sequence(tmp_path, workers):
    url = write_noise_shards(tmp_path / "s", n=100, max_samples=40)  # 3 shards, 4 or 8 streams
    kw = dict(workers=workers, flip=True, rank=1, world=4)
    reference = stream_for(url, **kw)
    assert reference.plan.by_ranges
    batches = model_inputs(reference, 20)  # crosses epochs
    first = stream_for(url, **kw)
    list(itertools.islice(first, 9))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = stream_for(url, **kw)
    resumed.load_state_dict(state)
    for want, got in zip(batches[9:], model_inputs(resumed, 11)):
        assert torch.equal(want, got)
    assert resumed.state_dict() == reference.state_dict()


def test_the_next_epochs_range_is_read_ahead_before_the_epoch_ends(tmp_path):
    """Once an epoch's first batch is out, the next epoch's range is already being read: with the
    storage gone from then on, the next epoch is still delivered whole."""
    folder = tmp_path / "s"
    url = write_noise_shards(folder, n=48, max_samples=16)
    s = stream_for(url, rank=2, world=8, batch=2, retries=0)  # 3 batches an epoch, one range read
    assert s.plan.by_ranges
    it = iter(s)
    next(it)
    _join_read_threads()
    for path in folder.iterdir():
        if path.name != "index.json":
            path.unlink()
    assert len(list(itertools.islice(it, 2 * s.batches_per_epoch - 1))) == 2 * s.batches_per_epoch - 1
    with pytest.raises(DataError, match="not found"):
        next(it)  # epoch 2 has nothing to read


@pytest.mark.s3
def test_ranges_on_s3_give_the_source_images_once(s3_server, tmp_path):
    import uuid
    url = f"s3://{s3_server['bucket']}/ranges-{uuid.uuid4().hex[:8]}"
    write_noise_shards(url, n=48, max_samples=16)
    seen, skipped = _epoch_keys(url, 8)
    assert sorted(seen) == sorted(_source_keys(48)) and skipped == 0


def _image_folder(root: Path, n: int) -> str:
    from PIL import Image
    root.mkdir()
    for i, im in enumerate(NoiseSource(n, 8).images):
        Image.fromarray(im).save(root / f"{i:03d}.png")
    return str(root)


def test_make_shards_sizes_shards_for_a_planned_world_and_warns_below_it(tmp_path, caplog):
    from ddpm_dist.cli.make_shards import main
    images = _image_folder(tmp_path / "images", 20)
    common = ["--source", "folder", "--input", images, "--workers", "0", "--no-progress"]
    with caplog.at_level(logging.WARNING):
        assert main(common + ["--out", str(tmp_path / "a"), "--plan-world-size", "2", "--plan-workers", "4"]) == 0
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [2] * 10  # 20 // 8 streams: 10 shards >= 8
    assert "planned" not in caplog.text
    with caplog.at_level(logging.WARNING):
        assert main(common + ["--out", str(tmp_path / "b"), "--plan-world-size", "4", "--plan-workers", "8"]) == 0
    lines = [r.getMessage() for r in caplog.records if "planned" in r.getMessage()]
    assert len(lines) == 1 and "20 shards" in lines[0] and "32 planned streams" in lines[0]


def test_make_shards_refuses_a_plan_of_zero(tmp_path, capsys):
    from ddpm_dist.cli.make_shards import main
    assert main(["--source", "digits", "--out", str(tmp_path / "a"), "--plan-world-size", "0"]) == 1
    assert "--plan-world-size must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
