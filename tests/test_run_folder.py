"""One writer per run folder, and a run folder that keeps what it has: the lock, what resume
compares, the final checkpoint before the final sample grid."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import ROOT, TINY, losses, run_train, wait_for_step


@pytest.mark.slow  # several training runs
def test_the_final_checkpoint_is_written_before_the_final_sample_grid(tmp_path):
    run = tmp_path / "run"
    code, err = run_train(run, "train.total_steps=4", "train.sample_every=4")
    assert code == 0, err[-2000:]
    manifest = run / "checkpoints" / "step_00000004" / "manifest.json"
    assert manifest.stat().st_mtime_ns <= (run / "samples" / "step_00000004.png").stat().st_mtime_ns

    # num_samples=0: no sample grids; the run ends normally with its final checkpoint
    other = tmp_path / "no_grids"
    code, err = run_train(other, "train.total_steps=4", "train.num_samples=0")
    assert code == 0, err[-2000:]
    assert (other / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    assert not (other / "samples").exists()


def folder_state(run: Path) -> dict[str, bytes]:
    """Every file of a run folder with its content."""
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow  # several training runs
def test_a_second_trainer_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    first = run_train(run, "train.total_steps=1000", wait=False)
    try:
        wait_for_step(run, 5, first)
        os.kill(first.pid, signal.SIGSTOP)  # it holds the lock and writes nothing meanwhile
        before = folder_state(run)
        code, err = run_train(run, "train.total_steps=1000", "optim.lr=3e-4", "seed=1")
        assert code == 2, err[-2000:]
        line = err.strip()
        assert "\n" not in line and line.startswith(f"error: {run} is in use by"), line
        assert f"pid {first.pid}" in line and socket.gethostname() in line, line
        assert folder_state(run) == before  # no metrics row, checkpoint, TensorBoard event, config
    finally:
        os.kill(first.pid, signal.SIGKILL)
        os.kill(first.pid, signal.SIGCONT)
        first.communicate()
    # The killed holder's record stays in the lock file, but flock locks end with their process:
    # the next run takes the lock over and resumes.
    assert f'"pid": {first.pid}' in (run / "run.lock").read_text()
    code, err = run_train(run, "train.total_steps=12")
    assert code == 0 and "resumed from" in err, err[-2000:]
    assert f'"pid": {first.pid}' not in (run / "run.lock").read_text()


@pytest.mark.slow  # several training runs
def test_resume_refuses_changed_settings_unless_allowed_and_records_the_change(tmp_path):
    run = tmp_path / "run"
    assert run_train(run, "train.total_steps=4")[0] == 0
    before = folder_state(run)
    code, err = run_train(run, "train.total_steps=8", "optim.lr=3e-4", "seed=1", "data.flip=true")
    line = err.strip()
    assert code == 2 and "\n" not in line, err[-2000:]
    assert line.startswith("error: ") and "data.flip (False → True), optim.lr (0.001 → 0.0003), seed (0 → 1)" in line
    assert "train.allow_config_change=true" in line
    before.pop("run.lock", None)
    after = folder_state(run)
    after.pop("run.lock", None)
    assert after == before

    # Settings that may change on resume need no override.
    code, err = run_train(run, "train.total_steps=6", "train.log_every=2", "train.keep_last=3", "data.num_workers=0")
    assert code == 0, err[-2000:]

    code, err = run_train(run, "train.total_steps=8", "optim.lr=3e-4", "train.allow_config_change=true")
    assert code == 0, err[-2000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    changes = [r for r in rows if "config_change" in r]
    assert changes == [{"step": 6, "config_change": {"optim.lr": [0.001, 0.0003]}}]


def _children(pid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie that nobody reaped has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ranks_end_when_torchrun_is_killed(tmp_path):
    from ddpm_dist.distributed import free_port
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "ddpm_dist.train", "--config", "configs/demo_digits.yaml", f"out_dir={run}", "engine=ddp",
           "device=cpu", *TINY, "train.total_steps=100000"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "torchrun.log", "w")  # not a pipe: orphaned ranks would keep it open
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
    ranks = []
    try:
        wait_for_step(run, 3, launcher)
        ranks = _children(launcher.pid)
        assert len(ranks) == 2, ranks
        os.killpg(launcher.pid, signal.SIGKILL)  # as kill -9 or the OOM killer hits the launcher
        launcher.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(map(_alive, ranks)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, ranks)), "ranks outlived their launcher"
    finally:
        for pid in ranks:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()


def test_a_second_reproduction_chain_is_refused_before_it_submits_anything(tmp_path):
    from ddpm_dist.utils.folder_lock import lock_folder
    run = tmp_path / "run"
    held = lock_folder(run, "reproduce.lock", "submitted jobs")  # the first chain, still submitting
    try:
        before = folder_state(run)
        # no Slurm commands on PATH: whatever got past the lock could not submit anyway
        env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
        proc = subprocess.run([sys.executable, str(ROOT / "launch" / "reproduce.py"), "configs/cifar10.yaml",
                               f"out_dir={run}", f"data.source={tmp_path / 'shards'}", "--raw-dir",
                               str(tmp_path / "raw"), "--partition", "debug"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        after = folder_state(run)
    finally:
        held.release()
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"reproduce: error: {run} is in use by pid {os.getpid()} on {socket.gethostname()}"), line
    assert after == before and not (tmp_path / "shards").exists()


def test_a_submitted_training_job_keeps_the_settings_it_was_submitted_with(tmp_path):
    import pickle
    from ddpm_dist.config import load_config
    from ddpm_dist.launch.train_job import TrainJob
    path = tmp_path / "demo.yaml"
    path.write_text((ROOT / "configs" / "demo_digits.yaml").read_text())
    submitted = load_config(path, ["train.total_steps=7"])
    job = pickle.loads(pickle.dumps(TrainJob(str(path), ["train.total_steps=7"])))  # as submitit stores it
    path.write_text(path.read_text().replace("lr: 1.0e-3", "lr: 0.5"))  # edited while the job waits
    assert job.resolved_config() == submitted
