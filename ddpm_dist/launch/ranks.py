"""Start W ranks of an entry-point module: here, as local processes, or as a Slurm job.

Every way ends in the same place: `python -m MODULE ARGV` runs once per rank with torchrun's
or srun's variables set, and `distributed.init_distributed` reads them. So a tool's main only
asks `needs_launch()`; if the ranks already exist (torchrun, srun, or a rank we spawned) it works.
"""
from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ddpm_dist

from ddpm_dist.distributed import detect_launch, free_port
from ddpm_dist.launch.slurm import JobResources, make_executor


def package_env(env: dict | None = None) -> dict:
    """`env` (default: this process's) with this checkout first on PYTHONPATH, so the ranks and
    jobs we start import the same ddpm_dist as we do, installed or not."""
    env = dict(os.environ if env is None else env)
    root = str(Path(ddpm_dist.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


_SUBMITTED_MARK = "DDPM_SUBMITTED_MODULE"  # in the environment a submitted job inherits: its module


def needs_launch(world_size: int) -> bool:
    """True when this process must start the ranks itself (not inside torchrun/srun, W > 1)."""
    return detect_launch().source == "single" and world_size > 1


def _die_with_parent() -> None:
    """Linux: the rank gets SIGKILL when the launcher dies, so a killed run leaves no orphans."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_local(module: str, argv: list[str], world_size: int) -> int:
    """W processes of `python -m module argv` on this machine with torchrun's variables; the first
    failure stops the others. Returns the exit code of the run."""
    port = free_port()
    # As torchrun: W ranks each with all cores' OpenMP threads oversubscribe the CPU, and
    # spinning OpenMP threads then slow every rank down many times over.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // world_size))
    procs = []
    for rank in range(world_size):
        env = dict(package_env(), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS=threads)
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env,
                                      preexec_fn=_die_with_parent))
    return _wait_all(procs)


def _wait_all(procs: list[subprocess.Popen]) -> int:
    """Wait for every rank; a rank that fails would leave the others blocked in a collective."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait()
            return failed[0]
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


def eval_resources(world_size: int, *, gpus_per_node: int, nodes: int | None = None, cpus_per_task: int | None = None,
                   timeout_min: int = 24 * 60, partition: str | None = None, name: str = "ddpm-eval") -> JobResources:
    """W tasks, the same count on every node: one GPU each over ceil(W / gpus_per_node) nodes, or
    with `gpus_per_node=0` W CPU tasks on one node; `nodes` spreads them over that many nodes
    instead (W / nodes each). CPUs per task default to 8 with GPUs, 1 without."""
    if gpus_per_node < 0 or world_size < 1 or (nodes is not None and nodes < 1):
        raise ValueError(f"--gpus-per-node must be >= 0, --world-size and --nodes >= 1, got {gpus_per_node}, "
                         f"{world_size}, {nodes}")
    if nodes is None:
        per_node = min(world_size, gpus_per_node) if gpus_per_node else world_size
        nodes = math.ceil(world_size / per_node)
        if nodes * per_node != world_size:
            raise ValueError(f"--world-size {world_size} must be at most --gpus-per-node {gpus_per_node} "
                             f"or a multiple of it (Slurm starts the same task count on every node)")
    per_node = world_size // nodes
    if nodes * per_node != world_size or (gpus_per_node and per_node > gpus_per_node):
        raise ValueError(f"--world-size {world_size} must be --nodes {nodes} times a task count per node"
                         + (f" of at most --gpus-per-node {gpus_per_node}" if gpus_per_node else "")
                         + " (Slurm starts the same task count on every node)")
    return JobResources(nodes=nodes, tasks_per_node=per_node, gpus_per_node=per_node if gpus_per_node else 0,
                        cpus_per_task=cpus_per_task or (8 if gpus_per_node else 1), timeout_min=timeout_min,
                        partition=partition, name=name)


def submit_command(module: str, argv: list[str], folder: str | Path, res: JobResources, *,
                   after: list[str] = ()):
    """Submit a job whose every task runs `python -m module argv` (srun sets SLURM_PROCID, which
    ranks read); returns the submitit Job without waiting."""
    import submitit  # optional: only this launcher needs it
    if os.environ.get(_SUBMITTED_MARK) == module:
        # A task of a job we submitted to run this same module, which cannot see srun's rank
        # variables: stop here rather than submit a job from every task (and again from theirs).
        raise RuntimeError("this process runs inside a job submitted by --launcher slurm but srun "
                           "set no SLURM_PROCID/SLURM_NTASKS; run the job's tasks under srun")
    executor = make_executor(folder, res, after=after)
    # sbatch exports this process's environment to the job; srun then adds SLURM_PROCID and
    # SLURM_NTASKS in each task. Passing an environment to the command instead would replace
    # those, and every task would think it is the launcher.
    saved = dict(os.environ)
    os.environ.update(package_env(), **{_SUBMITTED_MARK: module})
    try:
        return executor.submit(submitit.helpers.CommandFunction([sys.executable, "-m", module, *argv],
                                                                cwd=os.getcwd()))
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_slurm(module: str, argv: list[str], world_size: int, *, gpus_per_node: int, folder: str | Path,
              partition: str | None = None, timeout_min: int = 24 * 60, cpus_per_task: int | None = None,
              nodes: int | None = None) -> int:
    """`submit_command` on `eval_resources`, waiting for the job; one error line if it fails."""
    import submitit
    res = eval_resources(world_size, gpus_per_node=gpus_per_node, nodes=nodes, cpus_per_task=cpus_per_task,
                         timeout_min=timeout_min, partition=partition)
    job = submit_command(module, argv, folder, res)
    print(f"submitted Slurm job {job.job_id}: {world_size} tasks on {res.nodes} node(s); logs in {folder}",
          flush=True)
    try:
        _wait_for_rank_0(job)
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as err:
        job.cancel(check=False)  # the other tasks may wait on the failed one, or on a lost node's
        raise RuntimeError(_job_failure(job, err, folder)) from None
    return 0


def _wait_for_rank_0(job, poll_s: float = 2.0) -> None:
    """Until task 0 has its result (rank 0 writes the tool's), or a task failed: raises its
    error. Not the whole job: after a lost node, its tasks never report, and without Slurm
    accounting submitit cannot tell that the job ended. The job's end is the bound: then
    `results()` returns or raises."""
    tasks = [job.task(i) for i in range(job.num_tasks)]
    while not job.done():
        for task in tasks:
            if task.paths.result_pickle.exists() and (err := task.exception()) is not None:
                raise err
        if tasks[0].paths.result_pickle.exists():
            return
        time.sleep(poll_s)
    job.results()


def _job_failure(job, err: Exception, folder: str | Path) -> str:
    """One line for a job that did not finish: where a task ended with a tool's own error line,
    that line (submitit's message holds whole logs and tracebacks). Slurm's own state is not
    used: without accounting it stays PENDING for a cancelled job."""
    errors = [line.split(": error: ", 1)[1].strip() for line in str(err).splitlines() if ": error: " in line]
    why = errors[-1] if errors else "cancelled, out of time, or a task failed"
    return f"Slurm job {job.job_id} did not finish ({why}); each task's log is in {folder}"


def add_launch_arguments(parser) -> None:
    """How the distributed tools start their ranks."""
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="slurm launcher; 0: CPU tasks")
    parser.add_argument("--nodes", type=int, default=None,
                        help="slurm launcher: spread the W tasks over this many nodes (default: as few as hold them)")
    parser.add_argument("--cpus-per-task", type=int, default=None, help="slurm launcher; default 8 with GPUs, 1 without")
    parser.add_argument("--partition", help="slurm launcher")
    parser.add_argument("--timeout-min", type=int, default=24 * 60, help="slurm launcher")
