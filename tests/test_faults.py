"""Faults that must end a run, not hang it: a dead or stopped rank, a step that makes no
progress, a second stop signal. Real training processes on gloo; the failure is real too
(SIGKILL, SIGSTOP), never simulated."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddpm_dist.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[8]",
        "diffusion.num_timesteps=50", "train.batch_size=8", "train.num_samples=4", "train.log_every=1",
        "train.ckpt_every=1000", "train.sample_every=100000", "train.total_steps=100000", "device=cpu"]


def start_ranks(out_dir: Path, *overrides: str, world: int = 2) -> list[subprocess.Popen]:
    """`world` training ranks as plain processes (no torchrun: its agent would end the others
    itself, and the point is what a rank does on its own when a peer fails)."""
    port, procs = free_port(), []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        log = open(out_dir.parent / f"{out_dir.name}.rank{rank}.log", "w")
        cmd = [sys.executable, "-m", "ddpm_dist.train", "--config", "configs/demo_digits.yaml",
               f"out_dir={out_dir}", "engine=ddp", *TINY, *overrides]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def log_of(out_dir: Path, rank: int = 0) -> str:
    return (out_dir.parent / f"{out_dir.name}.rank{rank}.log").read_text()


def wait_training(out_dir: Path, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    """Until rank 0 has logged a few steps: every rank is inside the step loop."""
    deadline = time.monotonic() + timeout
    metrics = out_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        for rank, proc in enumerate(procs):
            assert proc.poll() is None, f"rank {rank} exited with {proc.returncode}"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            return
        time.sleep(0.1)
    pytest.fail(f"training did not start within {timeout} s")


def wait_exit(proc: subprocess.Popen, within: float) -> tuple[int, float]:
    start = time.monotonic()
    try:
        code = proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the surviving rank still ran {within} s after its peer failed")
    return code, time.monotonic() - start


def kill_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP])
def test_a_dead_or_stopped_rank_ends_the_other_within_the_collective_timeout(tmp_path, fault):
    out = tmp_path / "run"
    procs = start_ranks(out, "train.collective_timeout=20", "train.hang_timeout=0")
    try:
        wait_training(out, procs)
        procs[1].send_signal(fault)
        code, seconds = wait_exit(procs[0], within=120)
    finally:
        kill_all(procs)
    last = log_of(out, 0).strip().splitlines()[-1]
    assert code == 6, log_of(out, 0)[-3000:]
    assert last.startswith("error: a collective operation failed") and "another rank died or hung" in last
    assert "lost rank 1 on " in last, last  # its heartbeat stopped: the line names it
    assert seconds < 120


def test_watchdog_dumps_stacks_and_exits_when_no_step_finishes(tmp_path):
    # Rank 1 stopped, a collective timeout far away: rank 0 hangs in a collective, and only
    # the watchdog can end it.
    out = tmp_path / "run"
    procs = start_ranks(out, "train.collective_timeout=600", "train.hang_timeout=5")
    try:
        wait_training(out, procs)
        procs[1].send_signal(signal.SIGSTOP)
        code, seconds = wait_exit(procs[0], within=120)
    finally:
        kill_all(procs)
    log = log_of(out, 0)
    assert code == 6, log[-3000:]
    assert "no training step finished for" in log and "stacks of every thread follow" in log
    assert "most recent call first" in log and "train.py" in log  # faulthandler's dump of the loop


def test_second_stop_signal_ends_the_process_at_once(tmp_path):
    # Both signals wait while the process is stopped, so they arrive together: the first asks
    # for a checkpoint at the next step boundary, the second does not wait for it.
    out = tmp_path / "run"
    (proc,) = start_ranks(out, "engine=single", world=1)
    try:
        wait_training(out, [proc])
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        code, _ = wait_exit(proc, within=60)
    finally:
        kill_all([proc])
    assert code == -signal.SIGTERM, log_of(out, 0)[-3000:]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").glob("step_*[0-9]"))


def test_one_stop_signal_still_checkpoints_and_exits_3(tmp_path):
    out = tmp_path / "run"
    (proc,) = start_ranks(out, "engine=single", world=1)
    try:
        wait_training(out, [proc])
        proc.send_signal(signal.SIGINT)
        code, _ = wait_exit(proc, within=120)
    finally:
        kill_all([proc])
    assert code == 3, log_of(out, 0)[-3000:]
    assert any((out / "checkpoints").glob("step_*[0-9]"))


def _children() -> list[int]:
    """This process's child processes (Linux /proc)."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def test_loader_workers_ignore_stop_signals(tmp_path):
    # Slurm's --signal, scancel and Ctrl-C reach every process of the group, loader workers
    # included; the main process decides and stops them. A worker killed by the signal would
    # end the run with "DataLoader worker exited unexpectedly" instead of a checkpoint.
    from data_helpers import stream_for, write_noise_shards
    shards = write_noise_shards(tmp_path / "shards", n=200, res=8, max_samples=10)
    before = set(_children())
    batches = iter(stream_for(shards, workers=2, batch=4))
    next(batches), next(batches)  # one batch from each worker (in turn): both have started
    workers = [pid for pid in _children() if pid not in before]
    assert len(workers) == 2
    for sig in ("TERM", "INT", "USR1", "USR2"):  # sent by another process, as Slurm's are
        subprocess.run(["kill", f"-{sig}", *map(str, workers)], check=True)
    for _ in range(3 * 50):  # three epochs: every worker must keep producing
        next(batches)
    assert all(Path(f"/proc/{pid}").exists() for pid in workers)


def test_a_process_that_leaves_its_stream_open_still_exits(tmp_path):
    # Workers ignore stop signals from others, but not the shutdown their own main process
    # asks for: at exit, multiprocessing terminates (SIGTERM) and then joins every worker.
    from data_helpers import write_noise_shards
    shards = write_noise_shards(tmp_path / "shards", n=40, res=8, max_samples=10)
    script = ("import sys; sys.path.insert(0, 'tests'); from data_helpers import stream_for\n"
              f"batches = iter(stream_for({shards!r}, workers=2, batch=4)); next(batches)\n"
              "print('read a batch', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *(int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())]:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        pytest.fail("the process did not exit within 120 s after its last statement")
    assert out == "read a batch\n" and proc.returncode == 0


# Two ranks of a gloo group with the long timeout, as in a checkpoint write: rank 0 waits in a
# barrier that rank 1 never reaches, while the heartbeats are watched.
PATIENT_RANK = """
import datetime, sys, time
import torch.distributed as dist
from ddpm_dist.training.peers import Heartbeat
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
beats = Heartbeat(dist.get_rank(), 2)
beats.watch(float(sys.argv[1]), "writing the checkpoint of step 8")
print("ready", flush=True)
if dist.get_rank() == 0:
    dist.barrier()
time.sleep(600)
"""


@pytest.mark.slow
def test_a_rank_lost_while_a_checkpoint_is_written_ends_the_others_within_the_watch_limit(tmp_path):
    """The collective would wait 600 s; the watched heartbeats end rank 0 in seconds, naming rank 1."""
    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", PATIENT_RANK, "6"], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.stdout.read()
        procs[1].send_signal(signal.SIGSTOP)  # no beat, no exit message: a silent node
        code, seconds = wait_exit(procs[0], within=120)
        out = procs[0].stdout.read()
    finally:
        kill_all(procs)
    assert code == 6, out
    line = out.strip().splitlines()[-1]
    assert "error: another rank died or hung: lost rank 1 on " in line, out
    assert "(no heartbeat for 6 s while writing the checkpoint of step 8)" in line, line
    assert seconds < 60
