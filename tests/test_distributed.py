"""Launcher detection and Slurm node-list parsing (no process group needed), plus the
collectives on a real 2-rank gloo group."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from ddpm_dist import distributed as D


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("rack[1-2]-n[01,03]", ["rack1-n01", "rack1-n03", "rack2-n01", "rack2-n03"]),
    ("host-[009-011].cluster", ["host-009.cluster", "host-010.cluster", "host-011.cluster"]),
])
def test_parse_nodelist(nodelist, hosts):
    assert D.parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize("n, world_size", [(10, 3), (2, 4), (0, 2), (7, 1)])
def test_rank_split_gives_every_item_to_exactly_one_rank_in_even_shares(n, world_size):
    shares = [list(D.rank_split(range(n), r, world_size)) for r in range(world_size)]
    assert sorted(i for share in shares for i in share) == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert D.rank_split(torch.arange(n), 1 % world_size, world_size).tolist() == shares[1 % world_size]


def test_detect_torchrun_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5",
           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert D.detect_launch(env) == D.LaunchEnv("torchrun", 3, 8, 1, "10.0.0.5", 1234)


def test_detect_slurm(monkeypatch):
    monkeypatch.setattr(D.shutil, "which", lambda name: None)  # the parser, not this host's scontrol
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "123456"}
    launch = D.detect_launch(env)
    assert launch == D.LaunchEnv("slurm", 5, 8, 1, "gpu03", 15000 + 123456 % 20000)
    assert D.detect_launch({**env, "MASTER_PORT": "4000"}).master_port == 4000


def test_detect_single():
    assert D.detect_launch({}) == D.LaunchEnv("single")


def test_single_process_has_no_group():
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.device.type) == (0, 1, True, "cpu")
    assert D.any_flag(True) and not D.any_flag(False)
    t = torch.tensor([3.0])
    D.all_reduce_sum([t])
    assert float(t) == 3.0


def _collectives_worker(rank: int, port: int, env_kind: str) -> None:
    if env_kind == "torchrun":
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    else:
        os.environ.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                          SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    info = D.init_distributed("cpu")
    try:
        assert (info.rank, info.world_size, info.is_main) == (rank, 2, rank == 0)
        assert D.any_flag(rank == 1)        # one rank's stop request reaches all
        assert not D.any_flag(False)
        t = torch.tensor([float(rank)], dtype=torch.float64)
        D.all_reduce_sum([t])
        assert float(t) == 1.0
        D.barrier()
    finally:
        D.teardown()


@pytest.mark.parametrize("env_kind", ["torchrun", "slurm"])
def test_two_rank_collectives(env_kind, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    mp.spawn(_collectives_worker, args=(D.free_port(), env_kind), nprocs=2, join=True)


def test_always_group_gives_a_single_process_a_group(monkeypatch):
    # engine=ddp/fsdp/deepspeed need a group even for `python -m ddpm_dist.train` alone.
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed("cpu", always_group=True)
    try:
        assert D.dist.is_initialized() and D.dist.get_world_size() == 1 and info.world_size == 1
        t = torch.tensor([2.0])
        D.all_reduce_sum([t])
        assert D.any_flag(True) and float(t) == 2.0
    finally:
        D.teardown()
    assert not D.dist.is_initialized()
