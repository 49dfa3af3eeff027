"""The data path against a real S3 server (SeaweedFS on 127.0.0.1, see conftest.py)."""
from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
import torch.multiprocessing as mp
from PIL import Image

from conftest import s3_restart
from data_helpers import keys, model_inputs, stream_for, webdataset_samples, write_noise_shards
from ddpm_dist.config import DataConfig
from ddpm_dist.data import build_stream
from ddpm_dist.data.digits import load_digits_images
from ddpm_dist.data.fs import DataConfigError

pytestmark = pytest.mark.s3
ROOT = Path(__file__).resolve().parents[1]


def fresh_prefix(s3_server, name: str) -> str:
    return f"s3://{s3_server['bucket']}/{name}-{uuid.uuid4().hex[:8]}"


def make_shards(*args: str) -> None:
    cmd = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--no-progress", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in r.stdout + r.stderr


@pytest.fixture(scope="module")
def noise_url(s3_server):
    """120 unique 8² images in 12 shards on S3."""
    return write_noise_shards(fresh_prefix(s3_server, "noise"))


def test_make_shards_cli_to_s3_round_trip_matches_local(s3_server, tmp_path):
    url = fresh_prefix(s3_server, "digits")
    args = ["--source", "digits", "--resolution", "8", "--max-samples", "300", "--workers", "2"]
    make_shards(*args, "--out", url + "/")
    make_shards(*args, "--out", str(tmp_path))
    remote = json.loads(s3fs.S3FileSystem().cat_file(url.removeprefix("s3://") + "/index.json"))
    assert remote["shards"] == json.loads((tmp_path / "index.json").read_text())["shards"]
    from_s3 = model_inputs(stream_for(url, batch=16, workers=2, flip=True), 5)
    from_disk = model_inputs(stream_for(str(tmp_path), batch=16, workers=2, flip=True), 5)
    assert all(torch.equal(a, b) for a, b in zip(from_s3, from_disk))


def test_webdataset_reads_every_sample_from_s3(s3_server):
    url = fresh_prefix(s3_server, "wds")
    make_shards("--source", "digits", "--resolution", "8", "--max-samples", "500", "--workers", "1",
                "--out", url)
    digits = load_digits_images(8).permute(0, 2, 3, 1).numpy()  # what DigitsSource(8) loads
    samples = webdataset_samples(url)  # 4 shards, read through our s3:// opener
    assert [key for key, _, _ in samples] == [f"{i:09d}" for i in range(len(digits))]
    assert {sid: pixels for _, sid, pixels in samples} == \
        {str(i): im.tobytes() for i, im in enumerate(digits)}


def test_lsun_lmdb_converts_to_shards(s3_server, tmp_path):
    import lmdb

    rng = np.random.default_rng(0)
    with lmdb.open(str(tmp_path / "bedroom_train_lmdb"), map_size=1 << 26) as env, \
            env.begin(write=True) as txn:
        for i in range(12):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
            txn.put(f"{i:040x}".encode(), buf.getvalue())  # LSUN: hex image ids → JPEG bytes
    url = fresh_prefix(s3_server, "lsun")
    make_shards("--source", "lsun", "--input", str(tmp_path / "bedroom_train_lmdb"), "--out", url,
                "--resolution", "16", "--format", "jpg", "--max-samples", "5")
    s = stream_for(url, batch=4, res=16)
    assert s.batches_per_epoch == 3 and len(s.plan.shards) == 3
    assert next(iter(s)).images.shape == (4, 3, 16, 16)


def _rank_main(rank: int, url: str, out: str, env: dict) -> None:
    os.environ.update(env)
    s = stream_for(url, rank=rank, world=2, workers=1)
    epoch = model_inputs(s, s.batches_per_epoch)
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"batches": len(epoch), "keys": [k.hex() for x in epoch for k in keys(x)]}))


def test_two_rank_processes_see_disjoint_data_and_equal_counts(noise_url, tmp_path):
    mp.spawn(_rank_main, args=(noise_url, str(tmp_path), dict(os.environ)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["batches"] == r1["batches"] == 120 // 2 // 4
    assert len(set(r0["keys"])) == 60 and not set(r0["keys"]) & set(r1["keys"])


def test_resume_from_s3_continues_the_sequence(noise_url):
    reference = model_inputs(stream_for(noise_url, workers=2, flip=True), 40)
    first = stream_for(noise_url, workers=2, flip=True)
    list(itertools.islice(first, 25))
    resumed = stream_for(noise_url, workers=2, flip=True)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(reference[25:], model_inputs(resumed, 15)))


def test_stream_recovers_when_the_server_restarts(s3_server, caplog):
    url = write_noise_shards(fresh_prefix(s3_server, "restart"), n=64, max_samples=4)
    reference = model_inputs(stream_for(url), 12)  # one shard read per batch
    s = iter(stream_for(url))
    got = model_inputs(s, 4)
    s3_restart(stop_only=True)
    starter = threading.Thread(target=s3_restart)  # stop (no-op) + start while we read
    starter.start()
    t0 = time.monotonic()
    with caplog.at_level("WARNING"):
        got += model_inputs(s, 8)  # the reads during the outage retry with backoff
    starter.join()
    assert "cannot connect" in caplog.text and "retry 1/" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(reference, got)) and len(got) == 12
    assert time.monotonic() - t0 < 60


def test_wrong_endpoint_is_one_clear_error_within_seconds(noise_url):
    data = DataConfig(source=noise_url, s3_endpoint="http://127.0.0.1:1")
    t0 = time.monotonic()
    with pytest.raises(DataConfigError, match="cannot connect") as info:
        build_stream(data, 4, resolution=8)
    assert time.monotonic() - t0 < 10 and "\n" not in str(info.value)


def test_bad_credentials_and_missing_bucket_are_clear_errors(noise_url, monkeypatch):
    secret = "wrong-secret-value"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()  # cached clients hold the good keys
    t0 = time.monotonic()
    try:
        with pytest.raises(DataConfigError, match="access denied") as info:
            stream_for(noise_url)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert secret not in str(info.value) and time.monotonic() - t0 < 10
    monkeypatch.undo()
    with pytest.raises(DataConfigError, match="not found"):
        stream_for("s3://no-such-bucket-x/data")
    with pytest.raises(DataConfigError, match="not found"):
        stream_for(noise_url + "-empty-prefix")
