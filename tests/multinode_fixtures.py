"""The real 2-node Slurm test cluster, for tests marked `multinode` (tests/test_multinode.py).

tests/services/multinode_up.sh starts node1 and node2, each in network, UTS and mount namespaces
of its own behind a bridge, with one slurmd each and one slurmctld on the bridge (~2 s; or it
only checks them when they are up). The session's S3 server listens on 127.0.0.1, which the
nodes cannot reach: these tests get a SeaweedFS of their own on the bridge's address.
If the cluster cannot start, the tests FAIL: a skipped multi-node test would hide a broken
launcher. What this session started is stopped at the end.

Nothing here is exported to this process's environment (the single-node cluster's tests use
SLURM_CONF and the AWS_* variables too): tests pass `multinode_cluster["env"]` to what they run.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

__all__ = ["multinode_cluster", "multinode_s3"]

SERVICES = Path(__file__).parent / "services"


def _read_env_sh(path: Path) -> dict:
    lines = path.read_text().splitlines()
    return dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))


@pytest.fixture(scope="session")
def multinode_cluster():
    """{'conf', 'partition', 'nodes', 'addrs', 'netns' (each node's network namespace), 'bridge_addr',
    'on' (run-on-node script), 'dir', 'env' (os.environ with SLURM_CONF pointing at this cluster, no
    rendezvous variables)}."""
    state_dir = Path(os.environ.get("MN_TEST_DIR", "/tmp/ddpm-multinode-test"))
    try:
        proc = subprocess.run([str(SERVICES / "multinode_up.sh")], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail("2-node test cluster did not start within 900 s", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"2-node test cluster did not start: {proc.stderr.strip()[-800:]}", pytrace=False)
    was_up = "already running" in proc.stderr
    values = _read_env_sh(state_dir / "env.sh")
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS_VARS}
    env.update(SLURM_CONF=values["SLURM_CONF"], OMP_NUM_THREADS="1")
    yield {"conf": values["SLURM_CONF"], "partition": values["MN_TEST_PARTITION"],
           "nodes": values["MN_TEST_NODES"].split(","), "addrs": values["MN_TEST_ADDRS"].split(","),
           "netns": values["MN_TEST_NETNS"].split(","),
           "bridge_addr": values["MN_TEST_BRIDGE_ADDR"], "on": values["MN_TEST_ON"], "dir": state_dir,
           "env": env}
    if not was_up:
        subprocess.run([str(SERVICES / "multinode_down.sh")], capture_output=True, timeout=120)


# Left by a launcher around this test process, they would make every rank of a job think it is
# one of torchrun's; and a preload shim (the single-node cluster's) would bind to loopback.
_RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "LD_PRELOAD", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture(scope="session")
def multinode_s3(multinode_cluster, tmp_path_factory):
    """A SeaweedFS on the bridge address, reachable from both nodes and from this process:
    {'endpoint', 'bucket', 'env' (the cluster's env plus this server's AWS_* variables)}."""
    from conftest import S3Server
    server = S3Server(tmp_path_factory.mktemp("multinode-s3"), host=multinode_cluster["bridge_addr"])
    server.up()
    env = {**multinode_cluster["env"], **server.client_env()}
    yield {"endpoint": server.endpoint, "bucket": server.bucket, "env": env}
    server.down("--purge")
