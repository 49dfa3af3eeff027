"""Launching on a real Slurm cluster (tests/services/slurm_up.sh): sbatch scripts and submitit.

Every job is 2 tasks x 1 CPU with gloo on the 2-CPU test node, so jobs run one at a time. The
training is deterministic on CPU, so a run that was preempted, checkpointed, requeued and
resumed must end with exactly the weights of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ddpm_dist.modelio.model_file import read_model_file
from ddpm_dist.modelio.source import export_checkpoint

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
STEPS = 24
TINY = ["device=cpu", "engine=ddp", "model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
        "model.attn_resolutions=[8]", "diffusion.num_timesteps=50", "train.batch_size=8",
        "train.num_samples=4", "train.log_every=1", "train.ckpt_every=4", "train.sample_every=1000"]
CPU_JOB = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def wait_for(what: str, check, timeout: float, interval: float = 0.5):
    """Poll `check()` until it returns something truthy; fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def job_state(job_id: str) -> str:
    """The job's state in accounting (the newest run of a requeued job); '' before it is known."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
                         capture_output=True, text=True).stdout.split()
    return out[0].split()[0] if out else ""


def wait_done(job_id: str, timeout: float) -> str:
    """The final state; a requeued job passes through REQUEUED/PENDING, which are not final."""
    def final_state() -> str:
        state = job_state(job_id)
        return state if state in FINAL else ""
    return wait_for(f"job {job_id} to end", final_state, timeout)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def ema_weights(run_dir: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{run_dir.name}.safetensors"
    export_checkpoint(str(run_dir), str(out))
    return read_model_file(out)[0]


def job_vars(cluster: dict) -> dict:
    """Ranks use one thread each; the loopback shim keeps torch's TCPStore off the wildcard address."""
    return {"OMP_NUM_THREADS": "1", "LD_PRELOAD": f"{cluster['SLURM_TEST_DIR']}/lib/bindlo.so",
            "DDPM_PYTHON": sys.executable}


def job_env(cluster: dict, **extra: str) -> dict:
    return dict(os.environ, **job_vars(cluster), **extra)


SUBMIT_HERE = (sys.executable, "launch/sbatch.py")  # resolves the settings at submission, then sbatch


def sbatch(cluster: dict, run_dir: Path, *options: str, config: str = "configs/demo_digits.yaml",
           overrides: tuple[str, ...] = (), submit: tuple[str, ...] = ("sbatch",)) -> str:
    """Submit launch/train_lsun.sh with the CPU test settings, changing only variables and
    options (`submit`: the command that takes sbatch's arguments); returns the job id. The job
    log is run_dir/job.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = job_env(cluster, DDPM_CONFIG=config, DDPM_OUT_DIR=str(run_dir), DDPM_OVERRIDES=" ".join(TINY))
    cmd = [*submit, "--parsable", f"--partition={cluster['SLURM_TEST_PARTITION']}", *CPU_JOB,
           f"--output={run_dir}/job.log", *options, "launch/train_lsun.sh", f"train.total_steps={STEPS}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def cancel(job_id: str):
    """A no-op for a finished job; a job left running by a failed test would block the next."""
    subprocess.run(["scancel", job_id], capture_output=True)


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, tmp_path_factory) -> Path:
    """An uninterrupted sbatch run of STEPS steps."""
    run_dir = tmp_path_factory.mktemp("slurm") / "reference"
    job_id = sbatch(slurm_cluster, run_dir)
    try:
        state = wait_done(job_id, 180)
    finally:
        cancel(job_id)
    assert state == "COMPLETED", (run_dir / "job.log").read_text()[-3000:]
    return run_dir


def test_sbatch_runs_two_gloo_ranks_to_completion(reference_run):
    log = (reference_run / "job.log").read_text()
    assert "ddp on 2 x cpu" in log
    assert logged_steps(reference_run) == list(range(1, STEPS + 1))
    assert (reference_run / "checkpoints" / f"step_{STEPS:08d}").is_dir()


def preempt_when_running(job_id: str, run_dir: Path, edit: Path | None = None) -> None:
    """USR2 to every rank (as Slurm's --signal does before the time limit) once step 2 is done.
    `edit`: a config file the job was started from; its learning rate is changed before the
    signal, and the requeued job must train on with the settings it was submitted with."""
    wait_for("step 2", lambda: len(logged_steps(run_dir)) >= 2, 120, interval=0.2)
    if edit is not None:
        text = edit.read_text()
        assert "lr: 1.0e-3" in text
        edit.write_text(text.replace("lr: 1.0e-3", "lr: 0.5"))
    assert subprocess.run(["scancel", "--signal=USR2", job_id]).returncode == 0


def config_copy(tmp_path: Path) -> Path:
    """configs/demo_digits.yaml under its own name in a folder of the test's."""
    path = tmp_path / "configs" / "demo_digits.yaml"
    path.parent.mkdir()
    path.write_text((REPO / "configs" / "demo_digits.yaml").read_text())
    return path


def assert_resumed_like_reference(run_dir: Path, reference: Path, tmp_path: Path, log: str) -> None:
    """Stopped mid-run, resumed once, every step logged once, same final weights."""
    assert "resumed from" in log, log[-3000:]
    resumed_at = int(log.split("resumed from")[1].split("at step")[1].split()[0])
    assert 0 < resumed_at < STEPS
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    got, want = ema_weights(run_dir, tmp_path), ema_weights(reference, tmp_path)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_sbatch_preempted_job_requeues_and_matches_uninterrupted_run(slurm_cluster, reference_run, tmp_path):
    run_dir, config = tmp_path / "preempted", config_copy(tmp_path)
    job_id = sbatch(slurm_cluster, run_dir, config=str(config))
    try:
        preempt_when_running(job_id, run_dir, edit=config)
        state = wait_done(job_id, 240)
    finally:
        cancel(job_id)
    log = (run_dir / "job.log").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "requeueing job" in log and f"job {job_id} run 2:" in log
    assert_resumed_like_reference(run_dir, reference_run, tmp_path, log)


def test_submitit_job_preempted_requeues_and_matches_uninterrupted_run(slurm_cluster, reference_run, tmp_path,
                                                                        monkeypatch):
    from ddpm_dist.cli import submit  # what launch/submit.py and ddpm-submit run
    for key, value in job_vars(slurm_cluster).items():  # submitit's sbatch passes our env on
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # submit() extends it
    monkeypatch.chdir(REPO)
    config = config_copy(tmp_path)
    # --time 20: submitit calls a signal in the first min(80 %, limit - 10 min) a preemption, later
    # a time-out (counted against --max-requeues); this one must be a preemption
    args = submit.parse_args([
        "--config", str(config), "--partition", slurm_cluster["SLURM_TEST_PARTITION"],
        "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "20",
        "--folder", str(tmp_path / "submitit"), "--out-root", str(tmp_path), *TINY, f"train.total_steps={STEPS}"])
    (job,) = submit.submit(args)
    run_dir = tmp_path / "demo_digits"
    try:
        preempt_when_running(job.job_id, run_dir, edit=config)
        state = wait_done(job.job_id, 240)
    finally:
        cancel(job.job_id)
    log = Path(job.paths.stdout).read_text() + Path(job.paths.stderr).read_text()
    assert state == "COMPLETED", log[-3000:]
    assert job.results() == [STEPS, STEPS]  # one result per task, written once, by the last run
    # the loop's handler took the signal first (checkpoint), then submitit's requeued the job
    stop, requeue = log.find("stop requested (signal 12)"), log.find(f"Requeued job {job.job_id}")
    assert 0 <= stop and 0 <= requeue and "this job is preempted" in log, log[-3000:]
    assert_resumed_like_reference(run_dir, reference_run, tmp_path, log)


@pytest.mark.parametrize("submit, trained_lr", [(SUBMIT_HERE, 1.0e-3), (("sbatch",), 0.5)],
                         ids=["launch/sbatch.py", "plain sbatch"])
def test_a_config_edited_while_the_job_is_queued_reaches_only_a_plain_sbatch_job(slurm_cluster, tmp_path,
                                                                                 submit, trained_lr):
    """launch/sbatch.py freezes the settings when the job is submitted; plain sbatch when it
    first starts (as documented), so an edit made while the job waits in the queue applies."""
    run_dir, config = tmp_path / "queued", config_copy(tmp_path)
    job_id = sbatch(slurm_cluster, run_dir, "--hold", "--export=ALL", config=str(config),
                    overrides=("train.total_steps=2",), submit=submit)
    try:
        assert job_state(job_id) in ("PENDING", ""), job_state(job_id)  # held: not started
        config.write_text(config.read_text().replace("lr: 1.0e-3", "lr: 0.5"))
        assert subprocess.run(["scontrol", "release", job_id]).returncode == 0
        state = wait_done(job_id, 240)
    finally:
        cancel(job_id)
    log = (run_dir / "job.log").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert ("(resolved at submission)" in log) == (submit == SUBMIT_HERE), log[-3000:]
    trained = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert trained["optim"]["lr"] == trained_lr and trained["train"]["total_steps"] == 2
    assert logged_steps(run_dir) == [1, 2]


def test_sbatch_helper_refuses_a_bad_setting_before_submitting(tmp_path):
    proc = subprocess.run([*SUBMIT_HERE, "--hold", "launch/train_lsun.sh", "model.ch=abc"], cwd=REPO,
                          env=dict(os.environ, DDPM_CONFIG="configs/demo_digits.yaml", DDPM_OUT_DIR=str(tmp_path / "run"),
                               DDPM_PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: model.ch: expected int, got 'abc'", proc.stderr
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config, overrides, message", [
    ("configs/no_such.yaml", (), "error: config 'configs/no_such.yaml' not found"),
    ("configs/demo_digits.yaml", ("model.ch=abc",), "error: model.ch: expected int"),
])
def test_sbatch_bad_config_fails_fast_with_message_in_log(slurm_cluster, tmp_path, config, overrides, message):
    job_id = sbatch(slurm_cluster, tmp_path, config=config, overrides=overrides)
    try:
        state = wait_done(job_id, 90)
    finally:
        cancel(job_id)
    log = (tmp_path / "job.log").read_text()
    assert state == "FAILED" and message in log, log[-3000:]


def test_bad_partition_fails_at_submit_time(slurm_cluster, tmp_path):
    proc = subprocess.run(["sbatch", "--partition=no_such_partition", *CPU_JOB, f"--output={tmp_path}/job.log",
                           "launch/train_lsun.sh"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "invalid partition" in proc.stderr.lower(), proc.stderr
    from ddpm_dist.cli import submit  # what launch/submit.py and ddpm-submit run
    args = submit.parse_args(["--config", "configs/demo_digits.yaml", "--partition", "no_such_partition",
                              "--gpus-per-node", "0", "--folder", str(tmp_path / "submitit")])
    with pytest.raises(Exception, match="(?i)invalid partition"):
        submit.submit(args)


def test_submit_bad_config_fails_at_submit_time(tmp_path, capsys):
    from ddpm_dist.cli import submit
    code = submit.main(["--config", "configs/demo_digits.yaml", "--folder", str(tmp_path), "model.ch=abc"])
    assert code == 2 and "error: model.ch: expected int" in capsys.readouterr().err


# ------------------------------------------------------------ evaluation tools on Slurm ---

def _eval_tool(name: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _on_slurm(cluster) -> list:
    return ["--launcher", "slurm", "--gpus-per-node", 0, "--cpus-per-task", 1, "--timeout-min", 10,
            "--partition", cluster["SLURM_TEST_PARTITION"]]


def test_fid_sample_on_slurm_writes_the_samples_of_a_local_run(slurm_cluster, tmp_path):
    from test_sampling import _pngs, _save_random_model
    model = _save_random_model(tmp_path / "tiny.safetensors")
    common = ["--ckpt", model, "--num-samples", 6, "--seed", 7, "--device", "cpu", "--world-size", 2,
              "--batch-size", 2]
    _eval_tool("fid_sample.py", *common, "--out", tmp_path / "local", "--launcher", "local")
    _eval_tool("fid_sample.py", *common, "--out", tmp_path / "slurm", *_on_slurm(slurm_cluster))
    assert _pngs(tmp_path / "slurm") == _pngs(tmp_path / "local") and len(_pngs(tmp_path / "local")) == 6
    assert json.loads((tmp_path / "slurm" / "result.json").read_text())["world_size"] == 2


def test_a_cancelled_slurm_sampling_job_rerun_ends_with_exactly_n_samples(slurm_cluster, tmp_path):
    from ddpm_dist.evaluation.generate import missing_indices
    from test_sampling import _pngs, _save_random_model
    model, n = _save_random_model(tmp_path / "tiny.safetensors"), 60
    common = ["--ckpt", model, "--num-samples", n, "--seed", 7, "--device", "cpu", "--world-size", 2,
              "--batch-size", 1]
    out = tmp_path / "slurm"
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "fid_sample.py"), *map(str, common),
                             "--out", str(out), *map(str, _on_slurm(slurm_cluster))], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the first sample", lambda: len(missing_indices(out, n)) < n, timeout=240, interval=0.02)
        job_id = wait_for("the job id", lambda: subprocess.run(
            ["squeue", "-h", "-o", "%i", "-n", "ddpm-eval"], capture_output=True, text=True).stdout.split(), 30)[0]
        subprocess.run(["scancel", job_id], check=True)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    last = err.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith(f"fid_sample.py: error: Slurm job {job_id} did not finish"), err[-2000:]
    assert 0 < n - len(missing_indices(out, n)) < n, "the cancel landed mid-run"
    _eval_tool("fid_sample.py", *common, "--out", out, *_on_slurm(slurm_cluster))
    _eval_tool("fid_sample.py", *common, "--out", tmp_path / "local", "--launcher", "local")
    assert _pngs(out) == _pngs(tmp_path / "local") and len(_pngs(out)) == n


def test_eval_nll_on_slurm_equals_a_local_run(slurm_cluster, tmp_path):
    from test_sampling import _save_random_model
    model = _save_random_model(tmp_path / "tiny.safetensors")
    common = ["--ckpt", model, "--data", "digits", "--num-images", 4, "--batch-size", 2, "--device", "cpu",
              "--world-size", 2]
    _eval_tool("eval_nll.py", *common, "--out", tmp_path / "local.json", "--launcher", "local")
    _eval_tool("eval_nll.py", *common, "--out", tmp_path / "slurm.json", *_on_slurm(slurm_cluster))
    local, slurm = (json.loads((tmp_path / f).read_text()) for f in ("local.json", "slurm.json"))
    assert slurm["bits_per_dim"] == local["bits_per_dim"] and slurm["world_size"] == 2


def test_a_task_of_a_submitted_job_never_submits_another(tmp_path, monkeypatch):
    # A job's tasks inherit the submitting environment; one that cannot see srun's rank
    # variables must stop with one line, not submit a job of its own (and so on, without end).
    from test_sampling import _save_random_model
    model = _save_random_model(tmp_path / "tiny.safetensors")
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DDPM_SUBMITTED_MODULE", "ddpm_dist.cli.fid_sample")
    proc = _eval_tool("fid_sample.py", "--ckpt", model, "--num-samples", 2, "--device", "cpu", "--world-size", 2,
                      "--out", tmp_path / "out", "--launcher", "slurm", "--gpus-per-node", 0, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("fid_sample.py: error: this process runs inside a job"), proc.stderr
    assert not (tmp_path / "out" / "slurm").exists()
