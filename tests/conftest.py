"""Shared pytest fixtures. Each section belongs to one concern; keep them small."""
from __future__ import annotations

import os

# Each test process and every rank it spawns uses one intra-op thread: 2-core CI machines
# otherwise oversubscribe when two ranks run at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# ---------------------------------------------------------------- S3 test server ---
# A real S3 server (SeaweedFS) on 127.0.0.1, started by tests/services/s3_up.sh unless one is
# already up (CI starts it first; the script is idempotent and then takes ~0.2 s). Tests
# marked `s3` use it. If it cannot start, those tests FAIL: a skipped storage test would
# hide a broken data path. A server this session started is stopped at the end.
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SERVICES = Path(__file__).parent / "services"


def _s3_env(state_dir: str) -> dict:
    """The exports of the env.sh that s3_up.sh writes."""
    lines = Path(state_dir, "env.sh").read_text().splitlines()
    return dict(line.removeprefix("export ").split("=", 1) for line in lines if "=" in line)


def s3_restart(stop_only: bool = False) -> None:
    """Stop (and start again) the test server; data survives. Used by the restart test."""
    subprocess.run([str(SERVICES / "s3_down.sh")], check=True, capture_output=True)
    if not stop_only:
        subprocess.run([str(SERVICES / "s3_up.sh")], check=True, capture_output=True)


@pytest.fixture(scope="session")
def s3_server():
    """{'endpoint', 'bucket'}; the AWS_* variables are exported for the whole session."""
    if os.environ.get("S3_TEST_BUCKET") and os.environ.get("AWS_ENDPOINT_URL"):
        # the environment says a server is up (CI sourced env.sh): use it, leave it running
        yield {"endpoint": os.environ["AWS_ENDPOINT_URL"], "bucket": os.environ["S3_TEST_BUCKET"]}
        return
    state_dir = os.environ.get("S3_TEST_DIR", "/tmp/s3-test")
    proc = subprocess.run([str(SERVICES / "s3_up.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"S3 test server did not start: {proc.stderr.strip()[-500:]}", pytrace=False)
    was_up = "already running" in proc.stderr
    os.environ.update(_s3_env(state_dir))
    yield {"endpoint": os.environ["AWS_ENDPOINT_URL"], "bucket": os.environ["S3_TEST_BUCKET"]}
    if not was_up:
        subprocess.run([str(SERVICES / "s3_down.sh")], capture_output=True)


from slurm_fixtures import *  # noqa: E402,F401,F403  (Slurm test cluster: tests/slurm_fixtures.py)
