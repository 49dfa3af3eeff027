"""The real single-node Slurm test cluster, for tests marked `slurm` (tests/test_slurm.py).

tests/services/slurm_up.sh starts munged, MariaDB + slurmdbd (so sacct works), slurmctld and
slurmd on loopback, or only checks them when they are up (CI may start it first; then ~0.2 s).
If it cannot start, the tests FAIL: a skipped cluster test would hide a broken launcher.
A cluster this session started is stopped at the end.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

__all__ = ["slurm_cluster"]

SERVICES = Path(__file__).parent / "services"


def _read_env_sh(path: Path) -> dict:
    """The `export K=V` lines of the env.sh that slurm_up.sh writes."""
    lines = path.read_text().splitlines()
    return dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))


_PORT_IN_USE = re.compile(r"is in use \(set (SLURM_TEST_\w+_PORT)\)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_cluster() -> subprocess.CompletedProcess:
    """slurm_up.sh on its default ports; when another service holds one of them, the script
    names the variable that moves it: move it to a free port and start again (at most once per
    port)."""
    env = dict(os.environ)
    for _ in range(5):
        proc = subprocess.run([str(SERVICES / "slurm_up.sh")], env=env, capture_output=True, text=True)
        taken = _PORT_IN_USE.search(proc.stderr)
        if proc.returncode == 0 or not taken:
            return proc
        env[taken.group(1)] = str(_free_port())
    return proc


@pytest.fixture(scope="session")
def slurm_cluster():
    """The SLURM_CONF / SLURM_TEST_* variables, also exported to this process (and so to the
    sbatch, sacct and scancel it runs) for the whole session."""
    state_dir = Path(os.environ.get("SLURM_TEST_DIR", "/tmp/slurm-test"))
    proc = _start_cluster()
    if proc.returncode != 0:
        pytest.fail(f"Slurm test cluster did not start: {proc.stderr.strip()[-800:]}", pytrace=False)
    was_up = "already running" in proc.stderr
    env = _read_env_sh(state_dir / "env.sh")
    os.environ.update(env)
    yield env
    if not was_up:
        subprocess.run([str(SERVICES / "slurm_down.sh")], capture_output=True)
