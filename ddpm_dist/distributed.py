"""Process-group setup from torchrun, Slurm (srun) or a single process, and small collectives.

`init_distributed()` reads the launcher's environment, picks the device by local rank, and starts
NCCL on GPU or gloo on CPU. Nothing here knows about models; engines and the loop build on it.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import traceback
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

S = TypeVar("S")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def rank_split(items: S, rank: int, world_size: int) -> S:
    """The part of `items` (a list, range, tensor or array) that rank `rank` of `world_size` owns:
    every W-th item from position `rank`. Strided rather than contiguous, so shares differ by at
    most one item and stay even when items are skipped (finished samples, a tail)."""
    return items[rank::world_size]


def rank_block(n: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous block of range(n), for work whose neighbours belong together
    (rows of one file, images of one shard): blocks are in rank order and differ by at most one."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


@dataclass(frozen=True)
class LaunchEnv:
    """Who started us and where the rendezvous is; `source` is torchrun, slurm or single."""
    source: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def _split_top_level(nodelist: str) -> list[str]:
    """Split on the commas that are not inside brackets: "a[1-2,4],b" -> ["a[1-2,4]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    parts.append(nodelist[start:])
    return [p for p in parts if p]


def _expand_host(pattern: str) -> list[str]:
    """Expand the first bracket group, then recurse into the rest: "r[1-2]n[07,9]" -> 4 hosts.
    Ranges keep their zero padding ("01-03" -> 01, 02, 03), as Slurm writes them."""
    m = re.search(r"\[([^\]]*)\]", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[:m.start()], _expand_host(pattern[m.end():])
    hosts = []
    for item in m.group(1).split(","):
        lo, dash, hi = item.partition("-")
        values = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)] if dash else [lo]
        hosts.extend(head + v + t for v in values for t in tail)
    return hosts


def parse_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ("node[01-04,07],gpu1") as the hosts in order."""
    return [h for part in _split_top_level(nodelist.strip()) for h in _expand_host(part)]


def first_host(nodelist: str) -> str:
    """The rendezvous host: `scontrol show hostnames` where Slurm's tools exist, else our parser."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass  # a broken scontrol must not stop training: the parser knows the format
    return parse_nodelist(nodelist)[0]


def local_world_size(env: dict | None = None) -> int | None:
    """The ranks on this node as the launcher says: torchrun's LOCAL_WORLD_SIZE, else srun's
    SLURM_NTASKS_PER_NODE when every node has the same ("8" or "8(x64)"); None when unknown."""
    env = os.environ if env is None else env
    if env.get("LOCAL_WORLD_SIZE", "").isdigit():
        return int(env["LOCAL_WORLD_SIZE"])
    m = re.fullmatch(r"(\d+)(\(x\d+\))?", env.get("SLURM_NTASKS_PER_NODE", ""))
    return int(m.group(1)) if m else None


def _slurm_port(env: dict) -> int:
    """A port per job, so two jobs sharing a node do not collide; MASTER_PORT overrides."""
    if "MASTER_PORT" in env:
        return int(env["MASTER_PORT"])
    job_id = re.sub(r"\D", "", env.get("SLURM_JOB_ID", "0")) or "0"
    return 15000 + int(job_id) % 20000


def detect_launch(env: dict | None = None) -> LaunchEnv:
    """Read torchrun's variables first (torchrun inside an sbatch job wins over Slurm's), then
    srun's, else a single process."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]),
                         int(env.get("LOCAL_RANK", 0)), env.get("MASTER_ADDR", "127.0.0.1"),
                         int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or first_host(nodelist)
        return LaunchEnv("slurm", int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), addr, _slurm_port(env))
    return LaunchEnv("single")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeviceError(RuntimeError):
    """The requested device does not exist on this machine."""


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


DEFAULT_TIMEOUT_S = 600.0


def init_distributed(device: str = "auto", *, always_group: bool = False,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Start the process group the launcher asked for. A single process gets no group unless
    `always_group` (engines ddp/fsdp/deepspeed need one, even with one rank). A collective that
    waits more than `timeout_s` raises on every live rank (`is_collective_failure`)."""
    launch = detect_launch()
    dev = _pick_device(device, launch.local_rank)
    needs_group = launch.world_size > 1 or always_group or launch.source != "single"
    if needs_group and not dist.is_initialized():
        os.environ["MASTER_ADDR"] = launch.master_addr
        port = launch.master_port if launch.source != "single" else free_port()
        os.environ["MASTER_PORT"] = str(port)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=launch.rank,
                                world_size=launch.world_size, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(launch.rank, launch.world_size, launch.local_rank, dev, launch.rank == 0)


_BACKEND_MESSAGE = re.compile(r"gloo|nccl|ProcessGroup|c10d", re.IGNORECASE)


def is_collective_failure(err: BaseException) -> bool:
    """True when `err` comes from a collective: a peer rank died (connection reset) or hung
    (timeout). The cause is in that rank's log, not in this rank's traceback. Raised either in
    torch.distributed's Python code or, for DDP's gradient all-reduce, from the C++ backend
    inside backward (then only the backend's message says so)."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    if not isinstance(err, RuntimeError):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    inside = bool(frames) and f"torch{os.sep}distributed{os.sep}" in frames[-1].filename
    return inside or bool(_BACKEND_MESSAGE.search(str(err).split("\n", 1)[0]))


def set_collective_timeout(seconds: float) -> None:
    """The timeout of the default group's later collectives: training shortens it once its steps
    run, so that a lost peer ends the job in a minute, not in the start-up's ten."""
    if dist.is_initialized():
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def collective_device() -> torch.device:
    """NCCL reduces only CUDA tensors; gloo only CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors) -> None:
    """Sum each tensor over all ranks in place (on the backend's device: CUDA for NCCL, CPU for
    gloo); a no-op outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def agree_flags(any_rank: bool, rank0: bool) -> tuple[bool, bool]:
    """(True if any rank's `any_rank` is, rank 0's `rank0`), the same on every rank, in one
    all-reduce: a stop signal reaches one process and every rank must act on it, while a decision
    by the clock is rank 0's alone, so ranks whose clocks drift apart still agree."""
    if not dist.is_initialized():
        return bool(any_rank), bool(rank0)
    flags = [int(bool(any_rank)), int(bool(rank0) and dist.get_rank() == 0)]
    t = torch.tensor(flags, dtype=torch.int32, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    stop, due = t.tolist()
    return bool(stop), bool(due)


def any_flag(flag: bool) -> bool:
    """True on every rank when any rank says True: a preemption signal reaches one process, and
    all ranks must agree to stop (and save) at the same step boundary."""
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_bytes(data: bytes | None, src: int = 0) -> bytes:
    """Rank `src`'s `data` on every rank (the others pass None), as one uint8 tensor: a file that
    one rank read, sent to the others instead of each reading it."""
    if not dist.is_initialized():
        return data
    device, mine = collective_device(), dist.get_rank() == src
    size = torch.tensor([len(data) if mine else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    if int(size.item()) == 0:
        return b""
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if mine
           else torch.empty(int(size.item()), dtype=torch.uint8, device=device))
    dist.broadcast(buf, src)
    return data if mine else buf.cpu().numpy().tobytes()


def broadcast_from_main(value, src: int = 0):
    """Rank 0's (or `src`'s) `value` (JSON-able) on every rank: a decision taken once, from what
    that rank read, instead of each rank reading files that may change between the reads."""
    if not dist.is_initialized():
        return value
    mine = dist.get_rank() == src
    data = broadcast_bytes(json.dumps(value).encode() if mine else None, src)
    return value if mine else json.loads(data)


def first_rank_with(flag: bool) -> int | None:
    """The lowest rank whose `flag` is True, the same on every rank; None when no rank's is."""
    if not dist.is_initialized():
        return 0 if flag else None
    world = dist.get_world_size()
    t = torch.tensor([dist.get_rank() if flag else world], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    first = int(t.item())
    return first if first < world else None
