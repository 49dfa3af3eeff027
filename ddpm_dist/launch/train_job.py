"""Training as a submitit job that survives preemption and time limits (launch/submit.py).

submitit runs `TrainJob()` once per task, after installing its own handler for USR2 (dump
the job, `scontrol requeue`, exit). Inside `train()` the loop's StopRequest replaces that
handler, so a signal only sets a flag; all ranks agree on it at the next step boundary
(all-reduce), write one complete checkpoint and return. Only then, with the loop's handler
uninstalled again, do we hand the stop back to submitit's handler, which requeues the job.
No collective ever runs inside a signal handler.

A lost node or a storage outage is no signal: submitit would record the failure and Slurm would
end the job (or requeue it only once it marks the node DOWN, SlurmdTimeout later). So, as
launch/_train_job.sh does for sbatch jobs, every surviving rank prints its error line and asks
`scontrol requeue` itself, at most DDPM_MAX_FAULT_REQUEUES (default 3) times over the job's
restarts; the requeued job resumes from the last complete checkpoint.
"""
from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys

import submitit

from ddpm_dist.config import Config, config_from_dict, config_to_dict, load_config
from ddpm_dist.train import fault_status, train

MAX_FAULT_REQUEUES = 3  # the default of DDPM_MAX_FAULT_REQUEUES, as in launch/_train_job.sh


class TrainJob(submitit.helpers.Checkpointable):
    """`python -m ddpm_dist.train --config CONFIG OVERRIDES...` on every task of a submitit job.
    Its state is the command and the settings it resolved to when it was submitted: every start
    and requeue trains with those (an edit of the YAML file in between does not reach a queued
    or running job), and resumes from the newest checkpoint in out_dir."""

    def __init__(self, config: str, overrides: list[str]):
        self.config, self.overrides = config, list(overrides)
        self.settings = config_to_dict(load_config(config, overrides))

    def resolved_config(self) -> Config:
        return config_from_dict(self.settings)

    def __call__(self) -> int:
        # Rank, world size and rendezvous from submitit's view of the job (Slurm or local). Values
        # inherited from the submitting shell (a torchrun session, a test process) are stale here.
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(key, None)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        try:
            result = train(self.resolved_config())
        except Exception as err:
            _requeue_after_fault(err)
            raise
        if result.stopped_early:
            _stop_for_requeue(result.signum)
        return result.step


def _stop_for_requeue(signum: int | None) -> None:
    """After a clean stop: let submitit's own preemption handler requeue the job (it counts
    time-outs against max_num_timeout and exits; on ranks > 0 it only logs), then leave
    without a result, so the job is not reported finished."""
    if signum != signal.SIGTERM:
        # USR1/USR2, or the stop came from another rank: preemption or the time-limit warning
        signal.raise_signal(submitit.JobEnvironment._usr_sig())
    # SIGTERM: Slurm is already ending this run (scontrol requeue, scancel, the hard limit);
    # it requeues by itself where that was asked for.
    raise SystemExit(3)


def _requeue_after_fault(err: Exception) -> None:
    """Status 4 or 6 inside a Slurm job with requeues left: print the error line, ask Slurm to
    requeue the job and leave without a result (SystemExit). Returns for any other error, or
    when no requeue is left: then submitit records the failure."""
    status, line = fault_status(err)
    if status is None:
        return
    print(line, file=sys.stderr, flush=True)
    job_id, restarts = os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    limit = int(os.environ.get("DDPM_MAX_FAULT_REQUEUES") or MAX_FAULT_REQUEUES)
    if not job_id or restarts >= limit:
        print(f"not requeueing: {restarts} restart(s) of at most DDPM_MAX_FAULT_REQUEUES={limit}"
              if job_id else "not requeueing: not a Slurm job", file=sys.stderr, flush=True)
        return
    print(f"[{datetime.datetime.now().isoformat(timespec='seconds')}] status {status} (storage outage or a dead or "
          f"hung rank); requeueing job {job_id} to resume", file=sys.stderr, flush=True)
    # Every survivor asks: the first request requeues the job, later ones find it requeued.
    proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        print(f"scontrol requeue {job_id}: {proc.stderr.strip()} (another rank may have requeued it; if the job "
              f"ended, resubmit to resume)", file=sys.stderr, flush=True)
    raise SystemExit(status)
