"""Per-rank work at 64 nodes x 8 GPUs, measured on one machine with simulated ranks.

A simulated rank is this process given rank r of W by the launcher's variables and torch's
fake process group (its collectives return at once and leave their tensors as they are), so a
rank's own work can be counted for r = 0 … W-1 in turn: file checks, files read, files
fsynced, model rows. What needs the ranks' real exchange (sums, gathers, agreement) is tested
with real gloo processes here and in test_sampling.py. Each quantity must be O(N/W + 1).
"""
from __future__ import annotations

import builtins
import contextlib
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from ddpm_dist.config import Config, DiffusionConfig, ModelConfig, save_config
from ddpm_dist.distributed import DistInfo

W = 512  # 64 nodes x 8 GPUs
CPU = torch.device("cpu")


@contextlib.contextmanager
def simulated_rank(rank: int, world: int, monkeypatch):
    """This process as rank `rank` of `world` (torchrun's variables, a fake process group)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    with monkeypatch.context() as m:
        for key, value in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank % 8, "MASTER_PORT": 1}.items():
            m.setenv(key, str(value))
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            yield DistInfo(rank, world, rank % 8, CPU, rank == 0)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


class FileTouches:
    """Counts stat() and open() calls on paths under `root` (the real calls still run)."""

    def __init__(self, root: Path, monkeypatch):
        self.root, self.count = str(root), 0
        real_stat, real_open = os.stat, builtins.open

        def stat(path, *args, **kw):
            self._seen(path)
            return real_stat(path, *args, **kw)

        def open_(path, *args, **kw):
            self._seen(path)
            return real_open(path, *args, **kw)
        monkeypatch.setattr(os, "stat", stat)
        monkeypatch.setattr(builtins, "open", open_)

    def _seen(self, path) -> None:
        if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(self.root):
            self.count += 1

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


@pytest.fixture
def memory_dir():
    """A folder on tmpfs where there is one: fsync costs nothing there, and what these tests
    count is which files each rank touches, not the disk's speed."""
    import shutil
    import tempfile
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _tiny_config(resolution=8, num_timesteps=4) -> Config:
    model = ModelConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                        resolution=resolution)
    return Config(model=model, diffusion=DiffusionConfig(num_timesteps=num_timesteps))


# ---- the sampler: each rank checks and merges only its own share --------------------------------

def _finished_sample_folder(out: Path, n: int, job) -> None:
    """`n` finished 8x8 samples and the job's manifest, as a completed run leaves them."""
    import json
    from ddpm_dist.evaluation.generate import MANIFEST, sample_path
    rng = np.random.default_rng(0)
    for i in range(n):
        path = sample_path(out, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    (out / MANIFEST).write_text(json.dumps(job.manifest()))


def test_each_sampling_rank_checks_and_merges_only_its_share_of_the_samples(tmp_path, monkeypatch):
    """A rerun over 2,048 finished samples on 512 ranks: today every rank stat()s every PNG and
    rank 0 alone reads all of them into the npz."""
    from ddpm_dist.evaluation.generate import SampleJob, generate
    from ddpm_dist.modelio.factory import build_diffusion, build_model
    from ddpm_dist.samplers import Sampler
    cfg, n = _tiny_config(), 2048
    job = SampleJob(str(tmp_path / "samples"), n, seed=1, batch_size=4)
    _finished_sample_folder(Path(job.out), n, job)
    sampler = Sampler(build_model(cfg.model).eval(), build_diffusion(cfg.diffusion), (3, 8, 8))
    touches = FileTouches(Path(job.out), monkeypatch)
    per_rank = {}
    for rank in reversed(range(W)):  # rank 0 last: it finishes the npz the others filled
        with simulated_rank(rank, W, monkeypatch) as info:
            assert generate(job, sampler, info)["generated"] == 0
        per_rank[rank] = touches.take()
    share = math.ceil(n / W)
    assert max(per_rank.values()) <= 4 * share + 16, sorted(per_rank.items(), key=lambda kv: -kv[1])[:3]


def test_batch_size_auto_is_the_default():
    from ddpm_dist.cli.fid_sample import parse_args
    args = parse_args(["--random-init", "--num-samples", "8", "--out", "x"])
    assert args.batch_size == "auto"


# ---- checkpoints: every rank fsyncs only the files it wrote ---------------------------------------

def _deepspeed_save_layout(folder: Path, world: int) -> dict[int, set[str]]:
    """The files a ZeRO-2 bf16 save leaves on `world` ranks (DeepSpeed's names, our EMA files),
    and two writes still in flight (another rank's EMA and JSON temp files); returns what each
    rank wrote."""
    ds = folder / "deepspeed"
    ds.mkdir(parents=True)
    written = {r: {f"deepspeed/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt", f"deepspeed/ema_rank{r}.pt"}
               for r in range(world)}
    written[0] |= {"deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_to_fp32.py", "latest"}
    for names in written.values():
        for name in names:
            (folder / name).write_bytes(b"x")
    (ds / f".ema_rank{world - 1}.pt.tmp999").write_bytes(b"x")
    (folder / ".rank7.json.tmp999").write_bytes(b"x")
    return written


def test_each_deepspeed_rank_fsyncs_only_the_files_it_wrote(memory_dir, monkeypatch):
    """Rank 0 used to fsync every file not named zero_pp_rank_*: all ranks' EMA files and the
    temp files of writes in flight, which a rank may rename away meanwhile."""
    from ddpm_dist.training.engines import deepspeed_engine
    written = _deepspeed_save_layout(memory_dir, W)
    synced: list[str] = []
    real = deepspeed_engine.fsync_file
    monkeypatch.setattr(deepspeed_engine, "fsync_file",
                        lambda path: (synced.append(Path(path).relative_to(memory_dir).as_posix()), real(path)))
    for rank in range(W):
        deepspeed_engine.fsync_rank_files(memory_dir, rank)
        assert set(synced) <= written[rank] and len(synced) == len(set(synced)), (rank, synced)
        assert {n for n in written[rank] if "ema_rank" not in n} <= set(synced), rank  # EMA: atomic_path's
        synced.clear()


def test_a_thousand_simulated_deepspeed_saves_fsync_without_a_missing_file(memory_dir):
    """Eight ranks as threads write their files (the EMA file through a temp name and a rename)
    and fsync theirs, 1,000 times. The rule before (rank 0 synced every file not named
    zero_pp_rank_*) failed here about once per 1,000 saves: a temp file renamed under its open."""
    from ddpm_dist.training.engines.deepspeed_engine import fsync_rank_files
    from ddpm_dist.utils.files import atomic_write
    world, saves, root = 8, 1000, memory_dir
    start = threading.Barrier(world, timeout=60)
    failures: list[BaseException] = []

    def rank_saves(rank: int) -> None:
        for k in range(saves):
            folder = root / f"save_{k}"
            (folder / "deepspeed").mkdir(parents=True, exist_ok=True)
            start.wait()
            (folder / "deepspeed" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x" * 64)
            if rank == 0:
                (folder / "latest").write_text("deepspeed")
            atomic_write(folder / "deepspeed" / f"ema_rank{rank}.pt", b"y" * 64)
            try:
                fsync_rank_files(folder, rank)
            except OSError as e:
                failures.append(e)

    threads = [threading.Thread(target=rank_saves, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a simulated rank hung"
    assert failures == [], f"{len(failures)} of {saves} saves failed: {failures[:3]}"


# ---- eval_nll on shards: each rank reads its share of the test set --------------------------------

def test_eval_nll_on_shards_reads_only_each_ranks_share(tmp_path, monkeypatch):
    """512 test images in 64 shards of 8, on 64 simulated ranks: a rank's 8 images lie in one or
    two shards. Strided indices put each rank's images in 8 shards, so every rank read the whole
    test set between them."""
    from data_helpers import write_noise_shards
    from ddpm_dist.cli import eval_nll
    from ddpm_dist.data import stream
    world, n, per_shard = 64, 512, 8
    shards = write_noise_shards(tmp_path / "test_shards", n=n, res=8, max_samples=per_shard)
    save_config(_tiny_config(), tmp_path / "tiny.yaml")
    from ddpm_dist.data import shards as shard_index
    reads: list[str] = []
    real, real_index = stream.read_shard_at, shard_index.read_index
    monkeypatch.setattr(stream, "read_shard_at", lambda url, *a, **kw: (reads.append(url), real(url, *a, **kw))[1])
    monkeypatch.setattr(shard_index, "read_index", lambda *a, **kw: (reads.append("index.json"), real_index(*a, **kw))[1])
    args = eval_nll.parse_args(["--random-init", "--config", str(tmp_path / "tiny.yaml"), "--data", shards,
                                "--device", "cpu", "--batch-size", "8"])
    per_rank = []
    for rank in range(world):
        with simulated_rank(rank, world, monkeypatch):
            eval_nll.run_rank(args)
        assert reads.count("index.json") == 1, reads  # start-up: the index once
        per_rank.append(len(reads) - 1)
        reads.clear()
    assert max(per_rank) <= math.ceil(n / world / per_shard) + 1, per_rank
    assert sum(per_rank) <= n // per_shard + world, sum(per_rank)


# ---- the periodic sample grid: each rank samples its share of the rows ---------------------------

class RowCounter(torch.nn.Module):
    """The model, recording the batch size of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, []

    def forward(self, x, t):
        self.rows.append(x.shape[0])
        return self.model(x, t)


def _grid_model_and_diffusion():
    from ddpm_dist.modelio.factory import build_diffusion, build_model
    cfg = _tiny_config(num_timesteps=6)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the zero-initialised layers too
    return model, build_diffusion(cfg.diffusion)


GRID_SHAPE, GRID_SEED = (8, 3, 8, 8), 5


def _grid_as_one_process_samples_it():
    """What training's grid was before the split: all rows at once from one generator."""
    from ddpm_dist.images import to_uint8
    model, diffusion = _grid_model_and_diffusion()
    gen = torch.Generator().manual_seed(GRID_SEED)
    with torch.no_grad():
        return to_uint8(diffusion.p_sample_loop(model, GRID_SHAPE, generator=gen, device=CPU))


def _grid_worker(rank: int, world: int, port: int, out: str) -> None:
    from ddpm_dist import distributed
    from ddpm_dist.training.sample_grid import sample_grid
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    info = distributed.init_distributed("cpu")
    try:
        model, diffusion = _grid_model_and_diffusion()
        counted = RowCounter(model)
        with torch.no_grad():
            grid = sample_grid(counted, diffusion, GRID_SHAPE, GRID_SEED, info)
        torch.save({"rows": counted.rows, "grid": grid}, Path(out) / f"rank{rank}.pt")
    finally:
        distributed.teardown()


@pytest.mark.slow  # three processes start torch: ~20 s on 2 busy cores
def test_the_grid_split_over_3_gloo_ranks_is_the_one_process_grid_byte_for_byte(tmp_path):
    import torch.multiprocessing as mp
    from ddpm_dist.distributed import free_port
    world = 3
    mp.spawn(_grid_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert torch.equal(results[0]["grid"], _grid_as_one_process_samples_it())
    assert all(r["grid"] is None for r in results[1:])
    assert all(set(r["rows"]) == {math.ceil(GRID_SHAPE[0] / world)} for r in results)  # 3 of 8 rows each


def test_at_512_ranks_each_samples_one_row_of_a_64_sample_grid(monkeypatch):
    from ddpm_dist.training.sample_grid import sample_grid
    model, diffusion = _grid_model_and_diffusion()
    counted = RowCounter(model)
    for rank in (0, 1, 63, 64, 511):
        with simulated_rank(rank, W, monkeypatch) as info, torch.no_grad():
            sample_grid(counted, diffusion, (64, 3, 8, 8), GRID_SEED, info)
        assert counted.rows == [1] * diffusion.num_timesteps, (rank, counted.rows)
        counted.rows.clear()


# ---- time-based checkpoints: rank 0's clock decides for all ----------------------------------------

def test_ckpt_every_minutes_is_validated():
    from ddpm_dist.config import ConfigError, load_config
    assert load_config("configs/demo_digits.yaml").train.ckpt_every_minutes == 0  # off
    with pytest.raises(ConfigError, match="train.ckpt_every_minutes: must be 0 or more"):
        load_config("configs/demo_digits.yaml", ["train.ckpt_every_minutes=-1"])


def test_a_run_saves_by_the_clock_between_step_intervals(tmp_path):
    """ckpt_every is far away; a tiny ckpt_every_minutes is due at every agreement point (every
    10 steps), so step 10 is saved by the clock and step 11 as the last step."""
    from ddpm_dist.config import load_config
    from ddpm_dist.train import train
    tiny = ["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[8]",
            "diffusion.num_timesteps=50", "train.batch_size=4", "train.log_every=10", "train.num_samples=1",
            "train.ckpt_every=1000", "train.keep_last=5", "train.total_steps=11"]
    cfg = load_config("configs/demo_digits.yaml", [*tiny, f"out_dir={tmp_path}", "train.ckpt_every_minutes=1e-9"])
    train(cfg)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000010", "step_00000011"]


def _agree_worker(rank: int, port: int) -> None:
    from ddpm_dist import distributed
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distributed.init_distributed("cpu")
    try:
        # (a stop signal on any rank, this rank's clock says a checkpoint is due)
        assert distributed.agree_flags(False, rank == 1) == (False, False)  # rank 1's clock does not decide
        assert distributed.agree_flags(rank == 1, rank == 0) == (True, True)
        assert distributed.agree_flags(False, True) == (False, True)
    finally:
        distributed.teardown()


def test_only_rank_0s_clock_decides_and_any_ranks_stop_signal_counts():
    import torch.multiprocessing as mp
    from ddpm_dist.distributed import free_port
    mp.spawn(_agree_worker, args=(free_port(),), nprocs=2, join=True)


# ---- start-up reads: the Inception weights are read by rank 0 alone ---------------------------------

def _inception_worker(rank: int, world: int, port: int, weights: str, out: str) -> None:
    from ddpm_dist import distributed
    from ddpm_dist.evaluation.shared_weights import load_inception_once
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    reads = []
    real_open = builtins.open
    builtins.open = lambda path, *a, **kw: (reads.append(str(path)) if str(path) == weights else None,
                                            real_open(path, *a, **kw))[1]
    info = distributed.init_distributed("cpu")
    try:
        model = load_inception_once(weights, info)
    finally:
        builtins.open = real_open
        distributed.teardown()
    torch.save({"reads": len(reads), "state": model.state_dict()}, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow  # processes start torch and build Inception-v3: ~20 s on 2 busy cores
def test_only_rank_0_reads_the_inception_weights_and_every_rank_gets_them(tmp_path):
    import torch.multiprocessing as mp
    from ddpm_dist.distributed import free_port
    from ddpm_dist.metrics.inception import FIDInceptionV3
    torch.manual_seed(3)
    weights = tmp_path / "inception.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    world = 2
    mp.spawn(_inception_worker, args=(world, free_port(), str(weights), str(tmp_path)), nprocs=world, join=True)
    expected = torch.load(weights, weights_only=True)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert (got["reads"] > 0) == (rank == 0), (rank, got["reads"])
        assert all(torch.equal(got["state"][k], v) for k, v in expected.items()), rank


def test_only_rank_0_reads_the_model_weights_the_others_read_the_header(tmp_path, monkeypatch):
    """Ranks of 512 load a .safetensors model: rank 0 reads it, the others its header (the weights
    then go out by broadcast, which tests/test_sampling.py's 3-rank run checks sample for sample)."""
    from ddpm_dist.evaluation.shared_weights import load_model_once
    from ddpm_dist.modelio import model_file
    from ddpm_dist.modelio.factory import build_model
    cfg = _tiny_config()
    path = tmp_path / "tiny.safetensors"
    model_file.save_model_file(path, build_model(cfg.model).state_dict(), cfg)
    full_reads = []
    real = model_file.read_model_file
    monkeypatch.setattr(model_file, "read_model_file",
                        lambda p, weights=True: (full_reads.append(weights) if weights else None, real(p, weights))[1])
    for rank in (0, 1, 7, 8, 255, W - 1):  # each rank's reads do not depend on the others'
        with simulated_rank(rank, W, monkeypatch) as info:
            model, _ = load_model_once(str(path), None, False, info)
        assert model.resolution == 8 and full_reads == ([True] if rank == 0 else []), (rank, full_reads)
        full_reads.clear()
