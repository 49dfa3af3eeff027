"""Submit DDPM training through submitit: preemptible Slurm jobs, or local processes.

    python launch/submit.py --config configs/lsun_church.yaml --partition gpu --nodes 2
    python launch/submit.py --config configs/cifar10.yaml --seeds 0,1,2          # a job array
    python launch/submit.py --config configs/lsun_church.yaml --config configs/lsun_cat.yaml --time 1440
    python launch/submit.py --local --config configs/demo_digits.yaml --gpus-per-node 0 --cpus-per-task 2 \
        --tasks-per-node 2 engine=ddp device=cpu train.total_steps=200               # a laptop

Each job runs one rank per task (`ddpm_dist.launch.train_job.TrainJob`). On preemption or
`--signal-delay` seconds before the time limit every rank stops at the next step boundary,
a checkpoint is written, and the job is requeued and resumes from it. After a lost node or rank
(status 6) or a storage outage (status 4) the surviving tasks requeue the job themselves, at most
DDPM_MAX_FAULT_REQUEUES (default 3) times, and it resumes from the last checkpoint. Logs: --folder.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ddpm_dist.config import ConfigError, load_config
from ddpm_dist.launch.ranks import package_env
from ddpm_dist.launch.slurm import JobResources, make_executor


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", required=True, help="YAML config; repeat for an array")
    p.add_argument("--seeds", type=_int_list, default=[], help="comma-separated: one job per seed and config")
    p.add_argument("--out-root", default="runs", help="run folders: OUT_ROOT/<config>[_seed<S>]")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 on CPU-only clusters")
    p.add_argument("--tasks-per-node", type=int, help="default: one per GPU (1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--partition", default=os.environ.get("SBATCH_PARTITION"))
    p.add_argument("--account", default=os.environ.get("SBATCH_ACCOUNT"))
    p.add_argument("--time", type=int, default=24 * 60, help="time limit per run in minutes")
    p.add_argument("--signal-delay", type=int, default=300, help="USR2 this many s before the limit")
    p.add_argument("--max-requeues", type=int, default=100, help="time-outs before giving up")
    p.add_argument("--folder", default="runs/submitit", help="submitit logs and pickles, named by job id")
    p.add_argument("--local", action="store_true", help="run here as local processes, no Slurm")
    p.add_argument("--wait", action="store_true", help="wait for the jobs and report their steps")
    p.add_argument("overrides", nargs="*", help="key.sub=value settings for every job")
    return p.parse_args(argv)


def job_commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(config, overrides) per job; each job trains in its own out_dir. Validated here, so a
    bad config fails at submit time rather than in a queued job."""
    jobs = []
    for config in args.config:
        for seed in args.seeds or [None]:
            name = Path(config).stem + ("" if seed is None else f"_seed{seed}")
            extra = [f"out_dir={Path(args.out_root) / name}"] + ([] if seed is None else [f"seed={seed}"])
            overrides = extra + list(args.overrides)  # the user's out_dir= wins over ours
            load_config(config, overrides)
            jobs.append((config, overrides))
    return jobs


def make_job_executor(args: argparse.Namespace):
    """One task per GPU (one per node without GPUs unless --tasks-per-node), requeued on
    preemption, USR2 --signal-delay s before the time limit."""
    res = JobResources(nodes=args.nodes, tasks_per_node=args.tasks_per_node or max(1, args.gpus_per_node),
                       gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                       timeout_min=args.time, partition=args.partition, account=args.account)
    return make_executor(args.folder, res, local=args.local, requeue=True,
                         signal_delay_s=args.signal_delay, max_requeues=args.max_requeues)


def submit(args: argparse.Namespace) -> list:
    """Submit every job (as one array when several); returns submitit Job handles."""
    from ddpm_dist.launch.train_job import TrainJob
    commands = job_commands(args)
    # Jobs inherit this environment. They run `python -m submitit.core._submit` in the submit
    # directory: make our package importable there even when it is not installed; and give
    # each rank a thread pool of its own CPUs, or ranks sharing a node oversubscribe it.
    os.environ.update(package_env())
    os.environ.setdefault("OMP_NUM_THREADS", str(args.cpus_per_task))
    executor = make_job_executor(args)
    with executor.batch():
        jobs = [executor.submit(TrainJob(config, overrides)) for config, overrides in commands]
    for job, (config, overrides) in zip(jobs, commands):
        print(f"submitted {job.job_id}: {config} {' '.join(overrides)}; log {job.paths.stdout}", flush=True)
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        jobs = submit(args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.wait:
        for job in jobs:
            print(f"{job.job_id}: finished at step {job.results()[0]}", flush=True)  # one per task
    return 0


if __name__ == "__main__":
    sys.exit(main())
