"""The reproduction as one Slurm dependency chain (afterok):

    prepare → train → export → fid ┐
                             → nll ┴→ report

Each stage knows when it is done from the files it leaves (ddpm_dist/reproduce/plan.py), so
rerunning the same command submits only what is missing, waits on stages still queued from an
earlier invocation instead of submitting them twice, and does nothing once the report exists.
A failed stage cancels the stages after it (kill-on-invalid-dep); rerunning continues from it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ddpm_dist.launch.ranks import eval_resources, package_env
from ddpm_dist.launch.slurm import JobResources, make_executor, queued_job
from ddpm_dist.reproduce.plan import Plan
from ddpm_dist.reproduce.prepare import is_prepared
from ddpm_dist.training.checkpoint import latest_checkpoint, step_of
from ddpm_dist.utils.folder_lock import lock_folder


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    done: Callable[[Plan], bool]
    resources: Callable[[Plan, str], JobResources]  # (plan, stage name) → its job's resources


# How a stage other than train is submitted: (plan, stage name, resources, job ids to wait for)
# → job id. Each runs a command-line tool, whose arguments the tool's own module builds
# (ddpm_dist/cli/reproduce.py).
SubmitStage = Callable[[Plan, str, JobResources, list[str]], str]


def trained_step(plan: Plan) -> int:
    found = latest_checkpoint(plan.run / "checkpoints")
    return step_of(found) if found else 0


def _newer(path, than) -> bool:
    """`path` exists and was written after `than` (or `than` does not exist)."""
    return path.is_file() and (not than.exists() or path.stat().st_mtime >= than.stat().st_mtime)


def _result_of(path, plan: Plan) -> dict | None:
    """A stage's result JSON, if it was made from the current model file."""
    if not path.is_file() or not plan.model_file.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("weights_sha256") == model_sha256(plan) else None


def model_sha256(plan: Plan) -> str:
    from ddpm_dist.modelio.model_file import read_model_file, weights_sha256
    return weights_sha256(read_model_file(plan.model_file)[0])


def fid_done(plan: Plan) -> bool:
    result = _result_of(plan.fid_dir / "result.json", plan)
    return bool(result) and result["num_samples"] == plan.num_samples and len(result["seeds"]) == plan.seeds


def nll_done(plan: Plan) -> bool:
    return plan.test_data is None or _result_of(plan.nll_file, plan) is not None


def export_done(plan: Plan) -> bool:
    last = latest_checkpoint(plan.run / "checkpoints")
    return trained_step(plan) >= plan.cfg.train.total_steps and _newer(plan.model_file, last)


def report_done(plan: Plan) -> bool:
    return all(_newer(plan.report_file, f) for f in (plan.fid_dir / "result.json", plan.nll_file))


# --- submitting ---------------------------------------------------------------------------

def _cpu_job(plan: Plan, stage: str) -> JobResources:
    r = plan.resources
    return JobResources(cpus_per_task=r.cpus_per_task, timeout_min=r.eval_time_min, partition=r.partition,
                        account=r.account, name=plan.job_name(stage))


def _train_job(plan: Plan, stage: str) -> JobResources:
    r = plan.resources
    return JobResources(nodes=r.nodes, tasks_per_node=r.tasks_per_node or max(1, r.gpus_per_node),
                        gpus_per_node=r.gpus_per_node, cpus_per_task=r.cpus_per_task, timeout_min=r.train_time_min,
                        partition=r.partition, account=r.account, name=plan.job_name(stage))


def _ranks(plan: Plan, stage: str) -> JobResources:
    """The evaluation ranks, spread over as many nodes as training has."""
    r = plan.resources
    res = eval_resources(r.eval_world_size, gpus_per_node=r.gpus_per_node, nodes=r.nodes, cpus_per_task=r.cpus_per_task,
                         timeout_min=r.eval_time_min, partition=r.partition, name=plan.job_name(stage))
    return dataclasses.replace(res, account=r.account)


def submit_train(plan: Plan, res: JobResources, after: list[str]) -> str:
    """The training job: `TrainJob` in a requeueing executor (a preempted run continues)."""
    from ddpm_dist.launch.train_job import TrainJob
    r = plan.resources
    executor = make_executor(plan.slurm_folder, res, requeue=True, signal_delay_s=r.signal_delay_s,
                             max_requeues=r.max_requeues, after=after)
    return executor.submit(TrainJob(plan.config, list(plan.overrides))).job_id


STAGES = (
    Stage("prepare", (), is_prepared, _cpu_job),
    Stage("train", ("prepare",), lambda p: trained_step(p) >= p.cfg.train.total_steps, _train_job),
    Stage("export", ("train",), export_done, _cpu_job),
    Stage("fid", ("export",), fid_done, _ranks),
    Stage("nll", ("export",), nll_done, _ranks),
    Stage("report", ("fid", "nll"), report_done, _cpu_job),
)


def _queue(stage: Stage, plan: Plan, submit: SubmitStage, after: list[str], print_) -> str:
    """The id of the stage's job: one still queued from an earlier invocation, or a new one."""
    job_id = queued_job(plan.job_name(stage.name))
    if job_id:
        print_(f"{stage.name}: already queued as job {job_id}")
        return job_id
    res = stage.resources(plan, stage.name)
    if stage.name == "train":
        job_id = submit_train(plan, res, after)
    else:
        job_id = submit(plan, stage.name, res, after)
    print_(f"{stage.name}: submitted job {job_id}" + (f" (after {', '.join(after)})" if after else ""))
    return job_id


def run_chain(plan: Plan, submit: SubmitStage, *, prepare_here: bool, print_=print) -> dict[str, str]:
    """Submit every stage that is not done, each after the unfinished stages it needs: train
    here, the others through `submit`. Returns {stage: job id} of what is now queued
    (submitted here or found in the queue). One chain per run folder at a time: a second one
    would find nothing queued yet and submit every stage again."""
    lock = lock_folder(plan.run, CHAIN_LOCK, "submitted jobs")
    try:
        return _submit_stages(plan, submit, prepare_here=prepare_here, print_=print_)
    finally:
        lock.release()


CHAIN_LOCK = "reproduce.lock"


def _submit_stages(plan: Plan, submit: SubmitStage, *, prepare_here: bool, print_) -> dict[str, str]:
    # Jobs inherit this environment: our package importable where `python -m submitit...`
    # runs, and each rank's thread pool the size of its own CPUs.
    os.environ.update(package_env())
    os.environ.setdefault("OMP_NUM_THREADS", str(plan.resources.cpus_per_task))
    jobs: dict[str, str] = {}
    for stage in STAGES:
        if stage.name == "prepare" and prepare_here and not stage.done(plan):
            print_("prepare: running here")
            from ddpm_dist.reproduce.prepare import prepare
            prepare(plan)
        pending = [jobs[n] for n in stage.needs if n in jobs]
        if not pending and stage.done(plan):
            print_(f"{stage.name}: done")
            continue
        jobs[stage.name] = _queue(stage, plan, submit, pending, print_)
    sys.stdout.flush()
    return jobs
