"""Shared pytest fixtures. Each section belongs to one concern; keep them small."""
from __future__ import annotations

import os

# Each test process and every rank it spawns uses one intra-op thread: 2-core CI machines
# otherwise oversubscribe when two ranks run at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# ---------------------------------------------------------------- S3 test servers ---
# Real S3 servers (SeaweedFS, tests/services/s3_up.sh) on 127.0.0.1, each with its own state
# folder and free ports, so a server already running on this machine (another test session,
# another user's) cannot collide with ours. Tests marked `s3` use the session's server; outage
# tests stop a private one of their module. If a server cannot start, those tests FAIL: a
# skipped storage test would hide a broken data path.
import socket  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SERVICES = Path(__file__).parent / "services"


def _free_port_pair(taken: set[int], host: str = "127.0.0.1") -> int:
    """A port p with p and p + 10000 free on `host` (weed uses port + 10000 for gRPC)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or {port, port + 10000} & taken:
            continue
        try:
            with socket.socket() as s:
                s.bind((host, port + 10000))
        except OSError:
            continue
        taken |= {port, port + 10000}
        return port
    raise RuntimeError("no free port pair for an S3 test server")


class S3Server:
    """One SeaweedFS: `up()`, `down()` (data survives unless --purge), `endpoint`, `bucket`, and
    `client_env()`: the AWS_* variables a client uses. It listens on `host` only (the multi-node
    tests give it their bridge's address, which every node reaches)."""

    def __init__(self, state_dir: Path, access_key: str = "test-access-key", secret_key: str = "test-secret-key",
                 host: str = "127.0.0.1"):
        taken: set[int] = set()
        names = ("PORT", "MASTER_PORT", "VOLUME_PORT", "FILER_PORT")
        self.state_dir = Path(state_dir)
        self.env = {**os.environ, "S3_TEST_DIR": str(state_dir), "S3_TEST_HOST": host,
                    **{f"S3_TEST_{n}": str(_free_port_pair(taken, host)) for n in names},
                    "S3_TEST_ACCESS_KEY": access_key, "S3_TEST_SECRET_KEY": secret_key}
        self.endpoint = f"http://{host}:{self.env['S3_TEST_PORT']}"
        self.bucket = "test-bucket"

    def up(self) -> None:
        proc = subprocess.run([str(SERVICES / "s3_up.sh")], env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"S3 test server did not start: {proc.stderr.strip()[-500:]}", pytrace=False)

    def down(self, *args: str) -> None:
        subprocess.run([str(SERVICES / "s3_down.sh"), *args], env=self.env, capture_output=True)

    def client_env(self) -> dict:
        """The exports of the env.sh that s3_up.sh writes."""
        lines = (self.state_dir / "env.sh").read_text().splitlines()
        return dict(line.removeprefix("export ").split("=", 1) for line in lines if "=" in line)


_SESSION_S3: list[S3Server] = []


def s3_restart(stop_only: bool = False) -> None:
    """Stop (and start again) the session's server; data survives. Used by the restart test."""
    server = _SESSION_S3[0]
    server.down()
    if not stop_only:
        server.up()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """{'endpoint', 'bucket'}; the AWS_* variables are exported for the whole session."""
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.up()
    _SESSION_S3.append(server)
    os.environ.update(server.client_env())
    yield {"endpoint": server.endpoint, "bucket": server.bucket}
    server.down("--purge")


from slurm_fixtures import *  # noqa: E402,F401,F403  (Slurm test cluster: tests/slurm_fixtures.py)
from multinode_fixtures import *  # noqa: E402,F401,F403  (2-node cluster: tests/multinode_fixtures.py)


# ----------------------------------------------------- a private S3 server ---
# Outage tests stop their server; they use a second SeaweedFS of their own so that the other
# tests of the session are not disturbed.


@pytest.fixture(scope="module")
def private_s3(s3_server, tmp_path_factory):
    """A running S3Server (credentials as the session's); removed after the module."""
    server = S3Server(tmp_path_factory.mktemp("private-s3"), os.environ["AWS_ACCESS_KEY_ID"],
                      os.environ["AWS_SECRET_ACCESS_KEY"])
    server.up()
    yield server
    server.down("--purge")
