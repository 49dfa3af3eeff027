"""Bad data on local disk ends, loudly: corrupt samples, damaged, missing and escaping shards."""
from __future__ import annotations

import io
import itertools
import json
import logging
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_dist.config import ConfigError, load_config
from ddpm_dist.data import webdataset_urls
from ddpm_dist.data.fs import DataConfigError, DataError, DataReadError
from ddpm_dist.data.convert import tar_bytes
from ddpm_dist.data.shards import read_images, sha256
from data_helpers import huge_png, keys, model_inputs, stream_for, write_noise_shards


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _replace_shard(folder, i: int, images: list[bytes]) -> str:
    """Shard i holds `images` (any bytes), with index.json updated to match: intact on disk."""
    index_path = folder / "index.json"
    index = json.loads(index_path.read_text())
    data = tar_bytes([(f"{i:04d}{k:05d}.png", b) for k, b in enumerate(images)])
    name = index["shards"][i]["name"]
    (folder / name).write_bytes(data)
    index["shards"][i].update(samples=len(images), sha256=sha256(data), bytes=len(data))
    index_path.write_text(json.dumps(index))
    return name


def _drain(stream, limit: int = 20_000) -> int:
    """Batches read before the stream raises (or `limit`)."""
    n = 0
    for _ in itertools.islice(stream, limit):
        n += 1
    return n


def test_max_skip_fraction_defaults_to_one_percent_and_is_validated():
    assert load_config(None).data.max_skip_fraction == 0.01
    assert load_config(None, ["data.max_skip_fraction=0"]).data.max_skip_fraction == 0.0
    for bad in ("-0.1", "1", "1.5"):
        with pytest.raises(ConfigError, match=r"data\.max_skip_fraction") as info:
            load_config(None, [f"data.max_skip_fraction={bad}"])
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_with_no_decodable_image_stop_with_one_line_naming_the_shard(tmp_path, caplog,
                                                                           workers):
    folder = tmp_path / "s"
    write_noise_shards(folder, n=40, max_samples=10)
    for i in range(4):
        _replace_shard(folder, i, [b"not a png"] * 10)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(DataError) as info:
        _drain(stream_for(str(folder), workers=workers))
    message = str(info.value)
    assert "shard-00000" in message and "no decodable" in message and "\n" not in message
    assert not isinstance(info.value, DataReadError)  # bad input, not an outage
    assert time.monotonic() - t0 < 60 and len(caplog.records) <= 4


def test_a_high_fraction_of_corrupt_samples_stops_the_run_naming_the_shards(tmp_path, caplog):
    folder = tmp_path / "s"
    write_noise_shards(folder, n=200, max_samples=10)
    for i in range(20):  # 3 of every 10 samples undecodable
        _replace_shard(folder, i, [_png(i)] * 7 + [b"not a png"] * 3)
    s = stream_for(str(folder), batch=5)
    with caplog.at_level(logging.WARNING), pytest.raises(DataError) as info:
        _drain(s)
    message = str(info.value)
    assert "max_skip_fraction" in message and "shard-0000" in message and "\n" not in message
    assert not isinstance(info.value, DataReadError)
    warned = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert warned and all("3 corrupt samples" in m for m in warned)  # one line per shard read
    relaxed = stream_for(str(folder), batch=5, max_skip_fraction=0.5)
    assert _drain(relaxed, 3 * relaxed.batches_per_epoch) == 3 * relaxed.batches_per_epoch
    assert relaxed.skipped >= 3 * 60  # three epochs of 30% skipped, counted


def test_a_few_corrupt_samples_are_skipped_counted_and_warned_once_per_shard(tmp_path, caplog):
    folder = tmp_path / "s"
    write_noise_shards(folder, n=200, max_samples=10)
    name = _replace_shard(folder, 0, [_png(k) for k in range(9)] + [b"not a png"])
    s = stream_for(str(folder), batch=5)
    with caplog.at_level(logging.WARNING):
        assert _drain(s, 6 * s.batches_per_epoch) == 6 * s.batches_per_epoch  # 1200 samples
    warned = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert s.skipped >= 6 and len(warned) == s.skipped
    assert all(name in m and "1 corrupt sample" in m for m in warned)


def _shard_keys(data: bytes) -> set[bytes]:
    """The keys() of a shard's images as the stream would yield them (no flip)."""
    images = [np.array(Image.open(io.BytesIO(b)).convert("RGB")) for _, b in read_images(data, "")[0]]
    return {torch.from_numpy(im).permute(2, 0, 1).contiguous().numpy().tobytes() for im in images}


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_a_shard_that_fails_its_checksum_is_skipped_whole_and_counted(tmp_path, caplog, damage):
    folder = tmp_path / "s"
    write_noise_shards(folder, n=40, max_samples=10)
    path = folder / "shard-000001.tar"
    data = path.read_bytes()
    its_keys = _shard_keys(data)
    if damage == "truncated":
        path.write_bytes(data[:5000])  # cut in its fourth member
    else:  # same size, one byte inside the first image changed
        path.write_bytes(data[:560] + bytes([data[560] ^ 0xFF]) + data[561:])
    s = stream_for(str(folder), batch=2)
    with caplog.at_level(logging.WARNING):
        seen = {k for x in model_inputs(s, s.batches_per_epoch) for k in keys(x)}
    assert len(its_keys) == 10 and not seen & its_keys  # none of its samples is used
    assert s.skipped >= 10
    warned = [r.getMessage() for r in caplog.records if "shard-000001.tar" in r.getMessage()]
    assert len(warned) >= 1 and all("checksum differs" in m and "10" in m for m in warned)


def test_a_missing_shard_stops_with_one_line_naming_it(tmp_path):
    folder = tmp_path / "s"
    write_noise_shards(folder, n=40, max_samples=10)
    (folder / "shard-000002.tar").unlink()
    s = stream_for(str(folder), batch=2, retries=1, retry_wait=0.05)
    with pytest.raises(DataConfigError, match=r"shard-000002\.tar.*not found") as info:
        _drain(s, s.batches_per_epoch)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["../outside.tar", "sub/../../outside.tar", "..\\outside.tar",
                                  "/tmp/outside.tar", "s3://other-bucket/outside.tar",
                                  "http://example.com/outside.tar", ""])
def test_shard_names_escaping_the_folder_are_refused_at_start_up(tmp_path, name):
    folder = tmp_path / "data" / "s"
    write_noise_shards(folder, n=40, max_samples=10)
    shutil.copy(folder / "shard-000000.tar", tmp_path / "data" / "outside.tar")  # readable bait
    index = json.loads((folder / "index.json").read_text())
    index["shards"][1]["name"] = name
    (folder / "index.json").write_text(json.dumps(index))
    for start in (lambda: stream_for(str(folder)), lambda: webdataset_urls(str(folder))):
        with pytest.raises(DataConfigError, match="outside the data folder") as info:
            start()
        assert repr(name) in str(info.value) and "\n" not in str(info.value)


def test_an_image_far_larger_than_the_resolution_is_skipped_before_decoding(tmp_path, caplog):
    from ddpm_dist.data.stream import decode
    huge = huge_png(9500)
    started = time.perf_counter()
    with pytest.raises(ValueError, match="9500x9500"):
        decode(huge, 8)
    assert time.perf_counter() - started < 0.5  # the header only: decoding it takes seconds and 600 MB
    folder = tmp_path / "s"
    write_noise_shards(folder, n=200, max_samples=10)
    name = _replace_shard(folder, 0, [_png(k) for k in range(9)] + [huge])
    s = stream_for(str(folder), batch=5)
    with caplog.at_level(logging.WARNING):
        assert _drain(s, s.batches_per_epoch) == s.batches_per_epoch
    assert s.skipped == 1
    assert any(name in r.getMessage() and "1 corrupt sample" in r.getMessage() for r in caplog.records)
