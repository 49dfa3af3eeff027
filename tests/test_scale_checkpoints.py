"""Checkpoints at scale, with real gloo processes standing for many ranks: each file of a
checkpoint is hashed once per check (not once per rank), FSDP's `.metadata` is read once (not
twice per rank), a DDP resume reads the shards on one rank (not on all), DeepSpeed ZeRO-2 saves
one EMA in all (not one per rank), and every resume still continues bit for bit.

Each rank counts what it opens under the checkpoint folder (`io.open`, which pathlib and DCP's
reader use, and `open`) and which files it hashes, and writes the counts for the test to read.
"""
from __future__ import annotations

import builtins
import io
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ddpm_dist.config import Config, DiffusionConfig, ModelConfig
from ddpm_dist.distributed import free_port, init_distributed, teardown

DCP_WORLD, DS_WORLD = 3, 2
TINY = ModelConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), resolution=8, dropout=0.0)
BATCH = 2  # per rank


def make_cfg(engine: str, **train_kw) -> Config:
    cfg = Config(model=TINY, engine=engine)
    cfg.train.micro_batch_size, cfg.train.compile, cfg.train.ema_decay = BATCH, "false", 0.9
    for key, value in train_kw.items():
        setattr(cfg.train, key, value)
    return cfg


def new_engine(cfg: Config, info):
    from ddpm_dist.training.engines import build_engine
    from ddpm_dist.unet import UNet
    cfg.train.batch_size = BATCH * info.world_size
    torch.manual_seed(0)  # identical initial weights on every rank
    return build_engine(cfg, UNet(**vars(cfg.model)), torch.device("cpu"), info)


def train(engine, rank: int, steps: int = 2) -> None:
    """`steps` optimizer steps on batches that depend on the rank, the same on every call."""
    from ddpm_dist.modelio.factory import build_diffusion
    from ddpm_dist.training.step import train_step
    diffusion = build_diffusion(DiffusionConfig(num_timesteps=10))
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        batch = (torch.randn(BATCH, 3, 8, 8, generator=g), torch.randint(0, 10, (BATCH,), generator=g),
                 torch.randn(BATCH, 3, 8, 8, generator=g))
        train_step(engine, diffusion, [batch], 1e-3)


class Opens:
    """Counts the opens of files under `root` by name (the real opens still run)."""

    def __init__(self, root: Path):
        self.root, self.names = str(root), Counter()
        self._real = builtins.open

    def __enter__(self):
        def counted(file, *args, **kw):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(self.root):
                self.names[Path(file).name] += 1
            return self._real(file, *args, **kw)
        builtins.open = io.open = counted
        return self

    def __exit__(self, *exc):
        builtins.open = io.open = self._real


def _count_hashes(monkey: list) -> Counter:
    from ddpm_dist.training import checkpoint
    hashed, real = Counter(), checkpoint.file_sha256

    def counted(path):
        hashed[Path(path).name] += 1
        return real(path)
    checkpoint.file_sha256 = counted
    monkey.append(lambda: setattr(checkpoint, "file_sha256", real))
    return hashed


def _state(engine) -> dict:
    """Everything a resume must bring back, as plain tensors of this rank: weights, EMA and,
    for the torch engines, Adam's moments and step counts."""
    from torch.utils._pytree import tree_leaves
    from test_engines import full_ds_model_state, full_model_state
    local = lambda t: (t.to_local() if hasattr(t, "to_local") else t).detach().clone()  # noqa: E731
    ema = {n: local(t) for n, t in engine.ema.state_dict().items()}
    if engine.checkpoint_format == "deepspeed":
        return {"model": full_ds_model_state(engine), "ema": ema}
    model = {n: local(t) for n, t in full_model_state(engine).items()}  # rank 0's; views of the weights on CPU
    adam = [local(t) for t in tree_leaves(engine.optimizer.state_dict()["state"]) if isinstance(t, torch.Tensor)]
    return {"model": model, "ema": ema, "adam": dict(enumerate(adam))}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[p].keys() == b[p].keys() and all(torch.equal(a[p][k], v)
                                                                         for k, v in b[p].items()) for p in b)


def _start(rank: int, world: int, port: int):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    return init_distributed("cpu")


def _save_and_resume(engine_name: str, rank: int, world: int, info, out: Path, **train_kw) -> dict:
    """Train, save, train on; then a fresh engine resumes from the save and trains on the same
    batches. Returns this rank's counts of the resume and whether it continued exactly."""
    from ddpm_dist.training.checkpoint import load_checkpoint, save_checkpoint
    cfg = make_cfg(engine_name, **train_kw)
    engine = new_engine(cfg, info)
    train(engine, rank)
    folder = save_checkpoint(out / engine_name, 2, engine, {"data": {}}, keep_last=2, cfg=cfg)
    saved = _state(engine)
    train(engine, rank)
    straight = _state(engine)
    resumed, undo = new_engine(cfg, info), []
    hashed = _count_hashes(undo)
    try:
        with Opens(folder) as opens:
            load_checkpoint(folder, resumed)
    finally:
        for fn in undo:
            fn()
    exact = _same(_state(resumed), saved)
    # Training on continues exactly, given the same reduction order (DDP rebuilds its gradient
    # buckets after a fresh engine's first step, which regroups the sums over 3 ranks).
    train(resumed, rank)
    continues = _same(_state(resumed), straight)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return {"hashed": dict(hashed), "opens": dict(opens.names), "exact": exact, "continues": continues, "files": files,
            "folder": str(folder)}


def _dcp_worker(rank: int, world: int, port: int, out: str) -> None:
    info = _start(rank, world, port)
    try:
        result = {name: _save_and_resume(name, rank, world, info, Path(out)) for name in ("ddp", "fsdp")}
        result["refusals"] = _refusals(rank, world, info, Path(result["ddp"]["folder"]), result["ddp"]["hashed"])
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        teardown()


def _refusals(rank: int, world: int, info, folder: Path, hashed: dict) -> list[str]:
    """A planted file; a file that rank 1 hashed, altered in place; a crafted `.metadata` whose
    manifest entry matches (rank 0 reads it): every rank refuses each with one line, before
    anything is unpickled."""
    from ddpm_dist.distributed import barrier
    from ddpm_dist.training.checkpoint import CheckpointError, load_checkpoint
    engine, messages = new_engine(make_cfg("ddp"), info), []
    for damage in ("plant", "alter", "craft"):
        if rank == 0 and damage == "plant":
            (folder / "planted.pt").write_bytes(b"not listed")
        if rank == 0 and damage == "alter":
            (folder / "planted.pt").unlink()
        if rank == 1 and damage == "alter":
            shard = folder / sorted(hashed)[0]  # a file of rank 1's share (or, before, of every rank's)
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF
            shard.write_bytes(bytes(data))
        if rank == 0 and damage == "craft":  # a .metadata that runs code, its manifest entry made to match
            from test_checkpoint_faults import craft_metadata
            craft_metadata(folder, folder.parent / "pwned")
            from test_checkpoint_trust import rewrite_manifest
            rewrite_manifest(folder)
        barrier()
        try:
            load_checkpoint(folder, engine)
            messages.append("loaded")
        except CheckpointError as e:
            messages.append(str(e))
        barrier()
    return messages


@pytest.fixture(scope="module")
def dcp_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dcp")
    mp.spawn(_dcp_worker, args=(DCP_WORLD, free_port(), str(out)), nprocs=DCP_WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(DCP_WORLD)]


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_each_checkpoint_file_is_hashed_once_by_one_rank(dcp_results, engine):
    """Before, every rank hashed every file: W x the checkpoint's bytes, O(W^2) files in all."""
    files = dcp_results[0][engine]["files"]
    per_rank = [Counter(r[engine]["hashed"]) for r in dcp_results]
    assert sum(per_rank, Counter()) == Counter({Path(f).name: 1 for f in files if f != "manifest.json"})
    assert max(sum(c.values()) for c in per_rank) <= math.ceil(len(files) / DCP_WORLD), per_rank


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_dcp_metadata_is_read_once_by_rank_0(dcp_results, engine):
    """Before, every rank read `.metadata` twice to load (107 MB each at 512 ranks), besides
    hashing it. Now one rank hashes it and rank 0 reads it to load."""
    opens = [r[engine]["opens"].get(".metadata", 0) for r in dcp_results]
    hashes = [r[engine]["hashed"].get(".metadata", 0) for r in dcp_results]
    assert [o - h for o, h in zip(opens, hashes)] == [1] + [0] * (DCP_WORLD - 1), (opens, hashes)


def test_a_ddp_resume_reads_the_shards_on_rank_0_alone(dcp_results):
    """Before, every DDP rank read the whole checkpoint (2 TiB in all for the large model at 512
    ranks); now rank 0 reads it once and broadcasts it (the other ranks only hash their share)."""
    def loads(r):
        return sum(n - r["ddp"]["hashed"].get(name, 0) for name, n in r["ddp"]["opens"].items()
                   if name.endswith(".distcp"))
    shards = [loads(r) for r in dcp_results]
    assert shards[0] > 0 and shards[1:] == [0] * (DCP_WORLD - 1), shards


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_the_resume_restores_the_saved_state_bit_for_bit(dcp_results, engine):
    assert [r[engine]["exact"] for r in dcp_results] == [True] * DCP_WORLD


def test_an_fsdp_resume_trains_on_bit_for_bit(dcp_results):
    assert [r["fsdp"]["continues"] for r in dcp_results] == [True] * DCP_WORLD


def test_every_rank_refuses_a_planted_or_altered_file_in_one_line(dcp_results):
    for r in dcp_results:
        planted, altered, crafted = r["refusals"]
        assert "planted.pt is not listed in manifest.json" in planted and "\n" not in planted, planted
        assert "does not match its sha256" in altered and "\n" not in altered, altered
        assert ".metadata refused: it names" in crafted and "\n" not in crafted, crafted
    assert not (Path(dcp_results[0]["ddp"]["folder"]).parent / "pwned").exists()
    assert len({tuple(r["refusals"]) for r in dcp_results}) == 1  # the same line on every rank


# ---- DeepSpeed ZeRO-2: one EMA in the checkpoint, not one per rank ------------------------------

def _ds_worker(rank: int, world: int, port: int, out: str) -> None:
    info = _start(rank, world, port)
    try:
        result = _save_and_resume("deepspeed", rank, world, info, Path(out), zero_stage=2)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        teardown()


@pytest.mark.slow  # two DeepSpeed ranks start, save and resume: 48-228 s on 2 shared cores
def test_deepspeed_zero2_saves_one_ema_in_all_and_resumes_bit_for_bit(tmp_path):
    import deepspeed  # noqa: F401  (the test extras install it; missing must fail, not skip)
    from ddpm_dist.unet import UNet
    mp.spawn(_ds_worker, args=(DS_WORLD, free_port(), str(tmp_path)), nprocs=DS_WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(DS_WORLD)]
    assert [(r["exact"], r["continues"]) for r in results] == [(True, True)] * DS_WORLD
    folder = Path(results[0]["folder"])
    params = sum(p.numel() for p in UNet(**vars(TINY)).parameters())
    ema_bytes = sum(p.stat().st_size for p in (folder / "deepspeed").glob("ema_*"))
    # fp32: 4 bytes a parameter, once, plus torch.save's framing per file (a few KB).
    assert 4 * params <= ema_bytes <= 4 * params + 64 * 1024 * DS_WORLD, (ema_bytes, 4 * params)
    per_rank = [sum(r["hashed"].values()) for r in results]
    assert sum(per_rank) == len(results[0]["files"]) - 1, per_rank  # each file but the manifest, once
