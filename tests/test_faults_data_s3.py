"""Bad data and outages on a real S3 server end, loudly, and never hang.

Tests that stop a server use `private_s3` (conftest.py), a SeaweedFS of this module on free
ports, so that the shared test server stays up for everyone else.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import s3fs

from data_helpers import stream_for, write_noise_shards
from ddpm_dist.data.fs import DataConfigError

pytestmark = pytest.mark.s3
ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def live_s3(private_s3):
    """The module's private server, started again if an earlier test stopped it."""
    private_s3.up()
    return private_s3


def upload_noise_shards(server, local: Path, **kw) -> str:
    """Noise shards written to `local`, then put on the private server; their s3:// URL."""
    write_noise_shards(local, **kw)
    remote = f"{server.bucket}/{local.name}-{uuid.uuid4().hex[:8]}"
    client = s3fs.S3FileSystem(endpoint_url=server.endpoint)
    for path in sorted(local.iterdir()):
        client.put_file(str(path), f"{remote}/{path.name}")
    return f"s3://{remote}"


def test_a_missing_shard_on_s3_stops_with_one_line_naming_it(s3_server):
    url = write_noise_shards(f"s3://{s3_server['bucket']}/missing-{uuid.uuid4().hex[:8]}",
                             n=40, max_samples=10)
    s3fs.S3FileSystem().rm_file(url.removeprefix("s3://") + "/shard-000002.tar")
    s = stream_for(url, batch=2, retries=1, retry_wait=0.1)
    t0 = time.monotonic()
    with pytest.raises(DataConfigError, match=r"shard-000002\.tar: not found") as info:
        list(itertools.islice(s, s.batches_per_epoch))
    assert "\n" not in str(info.value) and time.monotonic() - t0 < 60


def test_start_up_retries_a_refused_connection_then_says_cannot_connect(live_s3, tmp_path, caplog):
    url = upload_noise_shards(live_s3, tmp_path / "startup", n=16, max_samples=4)
    live_s3.down()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING), \
            pytest.raises(DataConfigError, match="cannot connect") as info:
        stream_for(url, s3_endpoint=live_s3.endpoint)
    assert "retry 1/" in caplog.text and "\n" not in str(info.value)
    assert time.monotonic() - t0 < 30


CLOSE_SCRIPT = """
import sys
from data_helpers import stream_for
url, endpoint = sys.argv[1:3]
batches = iter(stream_for(url, s3_endpoint=endpoint, retries=5, retry_wait=1.0))
next(batches), next(batches)
print("read", flush=True)
sys.stdin.readline()  # the server is stopped now
next(batches)         # from the shard read ahead before the outage; the next read now hangs
print("closing", flush=True)
batches.close()
"""


def test_closing_a_stream_during_an_outage_exits_at_once(live_s3, tmp_path):
    url = upload_noise_shards(live_s3, tmp_path / "close", n=64, max_samples=4)  # a shard a batch
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}
    proc = subprocess.Popen([sys.executable, "-c", CLOSE_SCRIPT, url, live_s3.endpoint], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "read\n", proc.stderr.read()
        live_s3.down()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "closing\n", proc.stderr.read()
        t0 = time.monotonic()
        proc.wait(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 0 and elapsed < 5, (elapsed, proc.stderr.read()[-2000:])


TINY = ["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[8]",
        "model.resolution=8", "diffusion.num_timesteps=50", "train.batch_size=8",
        "train.log_every=1", "train.total_steps=100000", "train.ckpt_every=100000",
        "train.sample_every=100000", "optim.warmup_steps=10"]


def _wait_for_step(out_dir: Path, proc, step: int, timeout: float = 180) -> None:
    deadline, path = time.monotonic() + timeout, out_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        if path.exists() and any(json.loads(line)["step"] >= step
                                 for line in path.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"run did not reach step {step}")


def test_a_data_outage_mid_run_exits_with_status_4_and_one_error_line(live_s3, tmp_path):
    url = upload_noise_shards(live_s3, tmp_path / "outage", n=64, max_samples=4)
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "ddpm_dist.train", "--config", "configs/demo_digits.yaml",
           f"out_dir={out_dir}", *TINY, f"data.source={url}", f"data.s3_endpoint={live_s3.endpoint}",
           "data.retries=1", "data.retry_wait=0.2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for_step(out_dir, proc, 2)
        live_s3.down()
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 4, err[-2000:]
    assert len(errors) == 1 and ".tar: " in errors[0] and time.monotonic() - t0 < 60
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in err
