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
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ddpm_dist.launch.ranks import eval_resources, package_env, submit_command
from ddpm_dist.launch.slurm import JobResources, make_executor
from ddpm_dist.reproduce.plan import Plan
from ddpm_dist.reproduce.prepare import is_prepared
from ddpm_dist.training.checkpoint import latest_checkpoint, step_of
from ddpm_dist.utils.folder_lock import lock_folder


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    done: Callable[[Plan], bool]
    submit: Callable[[Plan, list[str], list[str]], str]  # (plan, after, argv) → job id


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


def _here(stage: str):
    """A one-task job running this stage of `ddpm-reproduce` (same arguments)."""
    def submit(plan: Plan, after: list[str], argv: list[str]) -> str:
        job = submit_command("ddpm_dist.cli.reproduce", [*argv, "--stage", stage], plan.slurm_folder,
                             _cpu_job(plan, stage), after=after)
        return job.job_id
    return submit


def _submit_train(plan: Plan, after: list[str], argv: list[str]) -> str:
    from ddpm_dist.launch.train_job import TrainJob
    r = plan.resources
    res = JobResources(nodes=r.nodes, tasks_per_node=r.tasks_per_node or max(1, r.gpus_per_node),
                       gpus_per_node=r.gpus_per_node, cpus_per_task=r.cpus_per_task, timeout_min=r.train_time_min,
                       partition=r.partition, account=r.account, name=plan.job_name("train"))
    executor = make_executor(plan.slurm_folder, res, requeue=True, signal_delay_s=r.signal_delay_s,
                             max_requeues=r.max_requeues, after=after)
    return executor.submit(TrainJob(plan.config, list(plan.overrides))).job_id


def _submit_export(plan: Plan, after: list[str], argv: list[str]) -> str:
    job = submit_command("ddpm_dist.cli.export", [str(plan.run), "--out", str(plan.model_file)],
                         plan.slurm_folder, _cpu_job(plan, "export"), after=after)
    return job.job_id


def _ranks(plan: Plan, stage: str) -> JobResources:
    r = plan.resources
    res = eval_resources(r.eval_world_size, gpus_per_node=r.gpus_per_node, cpus_per_task=r.cpus_per_task,
                         timeout_min=r.eval_time_min, partition=r.partition, name=plan.job_name(stage))
    return dataclasses.replace(res, account=r.account)


def _submit_fid(plan: Plan, after: list[str], argv: list[str]) -> str:
    args = ["--ckpt", str(plan.model_file), "--num-samples", str(plan.num_samples), "--seeds", str(plan.seeds),
            "--out", str(plan.fid_dir), "--ref-stats", str(plan.reference_stats),
            "--inception-weights", str(plan.inception_weights), "--sampler", plan.sampler,
            "--batch-size", "auto", "--world-size", str(plan.resources.eval_world_size)]
    if plan.sample_steps:
        args += ["--steps", str(plan.sample_steps)]
    return submit_command("ddpm_dist.cli.fid_sample", args, plan.slurm_folder, _ranks(plan, "fid"),
                          after=after).job_id


def _submit_nll(plan: Plan, after: list[str], argv: list[str]) -> str:
    args = ["--ckpt", str(plan.model_file), "--data", plan.test_data, "--out", str(plan.nll_file),
            "--world-size", str(plan.resources.eval_world_size)]
    if plan.nll_images:
        args += ["--num-images", str(plan.nll_images)]
    return submit_command("ddpm_dist.cli.eval_nll", args, plan.slurm_folder, _ranks(plan, "nll"),
                          after=after).job_id


STAGES = (
    Stage("prepare", (), is_prepared, _here("prepare")),
    Stage("train", ("prepare",), lambda p: trained_step(p) >= p.cfg.train.total_steps, _submit_train),
    Stage("export", ("train",), export_done, _submit_export),
    Stage("fid", ("export",), fid_done, _submit_fid),
    Stage("nll", ("export",), nll_done, _submit_nll),
    Stage("report", ("fid", "nll"), report_done, _here("report")),
)


def queued_job(name: str) -> str | None:
    """The id of a pending or running job of ours with this name (an earlier invocation's)."""
    out = subprocess.run(["squeue", "-h", "--me", "-n", name, "-t", "PENDING,RUNNING,REQUEUED,CONFIGURING",
                          "-o", "%i"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"squeue failed: {out.stderr.strip() or out.returncode}")
    ids = out.stdout.split()
    return ids[0] if ids else None


def run_chain(plan: Plan, argv: list[str], *, prepare_here: bool, print_=print) -> dict[str, str]:
    """Submit every stage that is not done, each after the unfinished stages it needs. Returns
    {stage: job id} of what is now queued (submitted here or found in the queue). One chain per
    run folder at a time: a second one would find nothing queued yet and submit every stage again."""
    lock = lock_folder(plan.run, CHAIN_LOCK, "submitted jobs")
    try:
        return _submit_stages(plan, argv, prepare_here=prepare_here, print_=print_)
    finally:
        lock.release()


CHAIN_LOCK = "reproduce.lock"


def _submit_stages(plan: Plan, argv: list[str], *, prepare_here: bool, print_) -> dict[str, str]:
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
        job_id = queued_job(plan.job_name(stage.name))
        if job_id:
            print_(f"{stage.name}: already queued as job {job_id}")
        else:
            job_id = stage.submit(plan, pending, argv)
            print_(f"{stage.name}: submitted job {job_id}" + (f" (after {', '.join(pending)})" if pending else ""))
        jobs[stage.name] = job_id
    sys.stdout.flush()
    return jobs
