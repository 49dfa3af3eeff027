"""The real single-node Slurm test cluster, for tests marked `slurm` (tests/test_slurm.py).

tests/services/slurm_up.sh starts munged, MariaDB + slurmdbd (so sacct works), slurmctld and
slurmd on loopback, or only checks them when they are up (CI may start it first; then ~0.2 s).
If it cannot start, the tests FAIL: a skipped cluster test would hide a broken launcher.
A cluster this session started is stopped at the end.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

__all__ = ["slurm_cluster"]

SERVICES = Path(__file__).parent / "services"


def _read_env_sh(path: Path) -> dict:
    """The `export K=V` lines of the env.sh that slurm_up.sh writes."""
    lines = path.read_text().splitlines()
    return dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))


@pytest.fixture(scope="session")
def slurm_cluster():
    """The SLURM_CONF / SLURM_TEST_* variables, also exported to this process (and so to the
    sbatch, sacct and scancel it runs) for the whole session."""
    state_dir = Path(os.environ.get("SLURM_TEST_DIR", "/tmp/slurm-test"))
    proc = subprocess.run([str(SERVICES / "slurm_up.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"Slurm test cluster did not start: {proc.stderr.strip()[-800:]}", pytrace=False)
    was_up = "already running" in proc.stderr
    env = _read_env_sh(state_dir / "env.sh")
    os.environ.update(env)
    yield env
    if not was_up:
        subprocess.run([str(SERVICES / "slurm_down.sh")], capture_output=True)
