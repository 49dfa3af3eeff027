"""The one place a Slurm job's resources are turned into a submitit executor: training jobs
(`ddpm-submit`, launch/submit.py) and evaluation ranks (`--launcher slurm`) both come here; and
the one query of Slurm's queue (`queued_job`)."""
from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ddpm_dist.utils.urls import control_character_error


SRUN_WAIT_S = 60  # as launch/_train_job.sh's srun --wait=60


@dataclass(frozen=True)
class JobResources:
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0          # 0: CPU tasks, no GPU request
    cpus_per_task: int = 1
    timeout_min: int = 24 * 60
    partition: str | None = None
    account: str | None = None
    name: str = "ddpm"


def _check_script_text(folder: str | Path, res: JobResources) -> None:
    """What submitit writes into the job script: a newline there would end a `#SBATCH` line and
    start a shell command."""
    for setting, value in (("the job folder", str(folder)), ("the job name", res.name),
                           ("the partition", res.partition), ("the account", res.account)):
        message = control_character_error(value, setting)
        if message:
            raise ValueError(message)


def make_executor(folder: str | Path, res: JobResources, *, local: bool = False, requeue: bool = False,
                  signal_delay_s: int | None = None, max_requeues: int | None = None,
                  after: Sequence[str] = ()):
    """A submitit executor for `res`. `local` runs the tasks as processes here (no Slurm).
    `requeue` lets Slurm requeue a preempted job under the same id, so it finds its pickle, log
    folder and out_dir again; USR2 comes `signal_delay_s` seconds before the time limit.
    `after`: job ids that must all succeed first (afterok); if one fails, Slurm cancels this
    job instead of keeping it pending forever."""
    import submitit  # optional: only launching through Slurm/submitit needs it
    _check_script_text(folder, res)
    options = {} if max_requeues is None else {"slurm_max_num_timeout": max_requeues}
    executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if local else None, **options)
    params = dict(nodes=res.nodes, tasks_per_node=res.tasks_per_node, cpus_per_task=res.cpus_per_task,
                  timeout_min=res.timeout_min, name=res.name,
                  # Slurm 22.05-23.02 srun does not inherit --cpus-per-task from sbatch. --wait:
                  # the step ends SRUN_WAIT_S after its first task exits, instead of waiting for
                  # the exit of the tasks of a lost node, which may never come.
                  slurm_srun_args=[f"--cpus-per-task={res.cpus_per_task}", f"--wait={SRUN_WAIT_S}"])
    extra = {}
    if requeue:
        extra["requeue"] = True
    if after:
        extra.update({"dependency": "afterok:" + ":".join(after), "kill-on-invalid-dep": "yes"})
    if extra:
        params["slurm_additional_parameters"] = extra
    if signal_delay_s is not None:
        params["slurm_signal_delay_s"] = signal_delay_s
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.partition:
        params["slurm_partition"] = res.partition
    if res.account:
        params["slurm_account"] = res.account
    executor.update_parameters(**params)
    return executor


def queued_job(name: str) -> str | None:
    """The id of a pending or running job of ours with this name (an earlier invocation's)."""
    out = subprocess.run(["squeue", "-h", "--me", "-n", name, "-t", "PENDING,RUNNING,REQUEUED,CONFIGURING",
                          "-o", "%i"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"squeue failed: {out.stderr.strip() or out.returncode}")
    ids = out.stdout.split()
    return ids[0] if ids else None
