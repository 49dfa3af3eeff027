"""The training entry point under torchrun with 2 real gloo ranks and FSDP2: kill -9 of the whole
job and resume reproduce the uninterrupted run, and a 2-rank checkpoint resumes on 1 rank."""
import os
import signal
import subprocess
import sys

import torch

from ddpm_dist.distributed import free_port
from ddpm_dist.modelio.model_file import read_model_file
from ddpm_dist.modelio.source import export_checkpoint
from test_train import ROOT, TINY, losses, wait_for_step


def torchrun(out_dir, nproc, *overrides, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "ddpm_dist.train", "--config", "configs/demo_digits.yaml",
           f"out_dir={out_dir}", "engine=fsdp", "device=cpu", *TINY, *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return err
    return proc


def kill_9_job(out_dir) -> None:
    """SIGKILL the launcher and every rank of the run writing to out_dir. torchrun starts its
    ranks in process groups of their own, so a group kill would miss them."""
    needle = f"out_dir={out_dir}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass


def test_fsdp_kill_resume_and_reshard_to_one_rank(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    torchrun(straight, 2, "train.total_steps=12")

    proc = torchrun(killed, 2, "train.total_steps=1000", wait=False)
    wait_for_step(killed, 5, proc)
    kill_9_job(killed)
    proc.communicate()
    err = torchrun(killed, 2, "train.total_steps=12")
    assert "resumed from" in err
    a, b = losses(straight), losses(killed)
    assert [a[s] for s in range(1, 13)] == [b[s] for s in range(1, 13)]
    export_checkpoint(straight, tmp_path / "a.safetensors")
    export_checkpoint(killed, tmp_path / "b.safetensors")
    wa, wb = read_model_file(tmp_path / "a.safetensors")[0], read_model_file(tmp_path / "b.safetensors")[0]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # The same run continues on one rank: weights and Adam state are resharded by DCP.
    err = torchrun(killed, 1, "train.total_steps=14")
    assert "resuming a 2-rank checkpoint on 1 ranks" in err
    after = losses(killed)
    assert max(after) == 14 and all(after[s] == b[s] for s in range(1, 13))
    assert all(0 < after[s] < 2 for s in (13, 14))
