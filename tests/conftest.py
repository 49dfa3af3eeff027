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


# ----------------------------------------------------- a private S3 server ---
# Outage tests stop their server; they use a second SeaweedFS of their own (own state folder,
# free ports) so that other tests and other users of the shared server are not disturbed.
import socket  # noqa: E402


def _free_port_pair(taken: set[int]) -> int:
    """A port p with p and p + 10000 free on 127.0.0.1 (weed uses port + 10000 for gRPC)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or {port, port + 10000} & taken:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        taken |= {port, port + 10000}
        return port
    raise RuntimeError("no free port pair for the private S3 server")


class PrivateS3:
    """A SeaweedFS of one test module: `up()`, `down()` (data survives), `endpoint`."""

    def __init__(self, state_dir: Path):
        taken: set[int] = set()
        names = ("PORT", "MASTER_PORT", "VOLUME_PORT", "FILER_PORT")
        self.env = {**os.environ, "S3_TEST_DIR": str(state_dir),
                    **{f"S3_TEST_{n}": str(_free_port_pair(taken)) for n in names},
                    "S3_TEST_ACCESS_KEY": os.environ["AWS_ACCESS_KEY_ID"],
                    "S3_TEST_SECRET_KEY": os.environ["AWS_SECRET_ACCESS_KEY"]}
        self.endpoint = f"http://127.0.0.1:{self.env['S3_TEST_PORT']}"
        self.bucket = os.environ["S3_TEST_BUCKET"]

    def up(self) -> None:
        proc = subprocess.run([str(SERVICES / "s3_up.sh")], env=self.env, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.fail(f"private S3 server did not start: {proc.stderr.strip()[-500:]}",
                        pytrace=False)

    def down(self, *args: str) -> None:
        subprocess.run([str(SERVICES / "s3_down.sh"), *args], env=self.env, capture_output=True)


@pytest.fixture(scope="module")
def private_s3(s3_server, tmp_path_factory):
    """A running PrivateS3 (credentials as the shared server's); removed after the module."""
    server = PrivateS3(tmp_path_factory.mktemp("private-s3"))
    server.up()
    yield server
    server.down("--purge")
