"""Training, sampling and scoring across two real hosts (tests/services/multinode_up.sh).

node1 and node2 each have their own hostname and address; ranks rendezvous over the bridge, read
the digits from an S3 server on the bridge, and write to the shared filesystem, as on a cluster.
On CPU every result is a function of the rank and the world size, not of where a rank runs: a
run over 2 nodes must equal, bit for bit, the same world size on one machine.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from ddpm_dist.modelio.model_file import read_model_file
from ddpm_dist.modelio.source import export_checkpoint
from test_slurm import FINAL, wait_for
from test_train import losses

pytestmark = pytest.mark.multinode

REPO = Path(__file__).resolve().parents[1]
# Node-loss runs lose node2 after step 10, between the checkpoints of steps 8 and 16: mid-step,
# where the short train.step_timeout applies. Every 2-node training run is compared with one
# run of these settings on one machine.
STEPS = 16
TINY = ["device=cpu", "engine=ddp", "model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
        "model.attn_resolutions=[8]", "diffusion.num_timesteps=50", "train.batch_size=8",
        "train.num_samples=4", "train.log_every=1", "train.ckpt_every=8", "train.sample_every=1000",
        f"train.total_steps={STEPS}"]
CPU_TASK = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def job_field(env: dict, job_id: str, field: str) -> str:
    """A field of `scontrol show job` ('' when unknown); this cluster keeps no accounting."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith(f"{field}=")), "")


def wait_done(env: dict, job_id: str, timeout: float) -> str:
    return wait_for(f"job {job_id} to end", lambda: (s := job_field(env, job_id, "JobState")) in FINAL and s, timeout)


def cancel(env: dict, job_id: str) -> None:
    subprocess.run(["scancel", job_id], env=env, capture_output=True)


def ema_weights(run_dir: Path) -> dict:
    out = run_dir.parent / f"{run_dir.name}.safetensors"
    export_checkpoint(str(run_dir), str(out))
    return read_model_file(out)[0]


def assert_same_training(run_dir: Path, reference: Path, steps: int = STEPS) -> None:
    """Every step's logged loss and the exported EMA weights, bit for bit."""
    assert losses(run_dir) == losses(reference) and sorted(losses(reference)) == list(range(1, steps + 1))
    got, want = ema_weights(run_dir), ema_weights(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def digits_url(multinode_s3):
    """The digits as shards on the bridge's S3 server."""
    url = f"s3://{multinode_s3['bucket']}/digits-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, str(REPO / "tools" / "make_shards.py"), "--no-progress", "--source", "digits",
           "--resolution", "16", "--max-samples", "200", "--workers", "1", "--out", url]
    proc = subprocess.run(cmd, env=multinode_s3["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return url


def train_overrides(url: str) -> list[str]:
    return [*TINY, f"data.source={url}"]


def train_on_one_node(run_dir: Path, env: dict, url: str, *overrides: str, ranks: int = 2) -> Path:
    """`ranks` ranks on this machine, `torchrun --standalone --nproc_per_node=RANKS`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m",
           "ddpm_dist.train", "--config", "configs/demo_digits.yaml", f"out_dir={run_dir}", *train_overrides(url),
           *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def one_node_run(multinode_s3, digits_url, tmp_path_factory) -> Path:
    """The reference of the 2-node runs."""
    return train_on_one_node(tmp_path_factory.mktemp("one-node") / "run", multinode_s3["env"], digits_url)


def sbatch_two_nodes(cluster: dict, env: dict, url: str, run_dir: Path, *overrides: str) -> str:
    """launch/train_lsun.sh on 2 nodes x 1 CPU task; the job log is run_dir/job.log."""
    run_dir.mkdir(parents=True)
    env = dict(env, DDPM_CONFIG="configs/demo_digits.yaml", DDPM_OUT_DIR=str(run_dir),
               DDPM_OVERRIDES=" ".join(train_overrides(url)), DDPM_PYTHON=sys.executable)
    proc = subprocess.run(["sbatch", "--parsable", f"--partition={cluster['partition']}", "--nodes=2",
                           "--ntasks-per-node=1", *CPU_TASK, f"--output={run_dir}/job.log", "launch/train_lsun.sh",
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def free_port_on(cluster: dict, node: str) -> int:
    """A port nothing listens on inside the node's network namespace."""
    code = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
    out = subprocess.run([cluster["on"], node, sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return int(out)


@pytest.mark.slow
def test_torchrun_on_two_nodes_trains_bitwise_like_one_node(multinode_cluster, multinode_s3, digits_url,
                                                            one_node_run, tmp_path):
    """Users without Slurm: one torchrun per node, c10d rendezvous on node1."""
    run_dir = tmp_path / "run"
    port = free_port_on(multinode_cluster, "node1")
    env = dict(multinode_s3["env"], PYTHONPATH=str(REPO))
    procs = []
    for rank, node in enumerate(("node1", "node2")):
        cmd = [multinode_cluster["on"], node, sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               f"--node-rank={rank}", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=node1:{port}",
               "--rdzv-id=multinode-test", "-m", "ddpm_dist.train", "--config", "configs/demo_digits.yaml",
               f"out_dir={run_dir}", *train_overrides(digits_url)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert_same_training(run_dir, one_node_run)


# ------------------------------------------------------------ evaluation tools over 2 nodes ---

def eval_tool(env: dict, name: str, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def on_two_nodes(cluster: dict, world_size: int) -> list:
    return ["--world-size", world_size, "--launcher", "slurm", "--nodes", 2, "--gpus-per-node", 0,
            "--cpus-per-task", 1, "--timeout-min", 10, "--partition", cluster["partition"]]


def test_eval_tasks_spread_over_the_nodes_asked_for():
    from ddpm_dist.launch.ranks import eval_resources
    res = eval_resources(4, gpus_per_node=0, nodes=2)
    assert (res.nodes, res.tasks_per_node, res.gpus_per_node) == (2, 2, 0)
    res = eval_resources(8, gpus_per_node=8, nodes=2)
    assert (res.nodes, res.tasks_per_node, res.gpus_per_node) == (2, 4, 4)
    assert eval_resources(16, gpus_per_node=8).nodes == 2  # without --nodes: as few as hold them
    with pytest.raises(ValueError, match="--world-size 3 must be --nodes 2 times"):
        eval_resources(3, gpus_per_node=0, nodes=2)
    with pytest.raises(ValueError, match="at most --gpus-per-node 4"):
        eval_resources(16, gpus_per_node=4, nodes=2)


@pytest.mark.slow
def test_fid_sample_over_two_nodes_survives_a_lost_node_and_its_rerun_scores_like_one_process(
        multinode_cluster, tmp_path):
    """node2's processes are killed while both ranks sample: the survivor writes the rest of its
    share, fails at the first collective with one line, and the launcher ends. Rerun once node2
    is back, the same command writes only the missing samples: N PNGs equal to an uninterrupted
    single process's, and the same statistics."""
    import numpy as np
    from test_sampling import _pngs, _random_inception, _save_random_model
    n, cluster, env = 12, multinode_cluster, multinode_cluster["env"]
    model = _save_random_model(tmp_path / "tiny.safetensors")
    weights = _random_inception(tmp_path / "inception.pth")
    args = ["--ckpt", model, "--num-samples", n, "--seed", 7, "--device", "cpu", "--batch-size", 1,
            "--inception-weights", weights]
    eval_tool(env, "fid_sample.py", *args, "--out", tmp_path / "one", "--world-size", 1)
    two_nodes = [*args, "--out", tmp_path / "two", *on_two_nodes(cluster, 2)]
    log = (tmp_path / "launcher.log").open("w")
    launcher = subprocess.Popen([sys.executable, str(REPO / "tools" / "fid_sample.py"), *map(str, two_nodes)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        odd = lambda: [p for p in _pngs(tmp_path / "two") if int(p[:-4]) % 2]  # rank 1's samples
        wait_for("rank 1's first sample", odd, 300, 0.1)
        lose_node2(cluster, "killed")
        lost_at, made_by_rank_1 = time.monotonic(), len(odd())
        rank0_log = lambda: next((tmp_path / "two" / "slurm").glob("*_0_log.err"), None)
        wait_for("the survivor's error line", lambda: (f := rank0_log()) and "fid_sample.py: error:" in f.read_text(),
                 300, 0.2)
        survivor_s = time.monotonic() - lost_at
        launcher.wait(timeout=120)
        launcher_s = time.monotonic() - lost_at
    finally:
        launcher.kill()
        bring_back_node2(cluster)
    out = (tmp_path / "launcher.log").read_text()
    print(f"fid_sample, node2 killed: survivor failed after {survivor_s:.0f} s, launcher ended after {launcher_s:.0f} s")
    assert made_by_rank_1 < n // 2, "rank 1 had finished before node2 was lost: nothing was tested"
    assert launcher.returncode == 1 and "did not finish" in out.strip().splitlines()[-1], out[-3000:]
    assert 0 < len(_pngs(tmp_path / "two")) < n

    rerun = eval_tool(env, "fid_sample.py", *two_nodes)
    assert "2 tasks on 2 node(s)" in rerun.stdout
    assert _pngs(tmp_path / "two") == _pngs(tmp_path / "one") and len(_pngs(tmp_path / "one")) == n
    with np.load(tmp_path / "one" / "inception_stats.npz") as one, np.load(tmp_path / "two" / "inception_stats.npz") as two:
        assert np.abs(one["sigma"]).max() > 1e-4  # features that can differ
        np.testing.assert_allclose(two["mu"], one["mu"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(two["sigma"], one["sigma"], rtol=1e-9, atol=1e-12)
    one, two = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2 and two["inception_score"] == pytest.approx(one["inception_score"], rel=1e-9)
    assert 0 < two["runs"][0]["generated"] < n  # the rerun made only what the lost run had not


# ------------------------------------------------------------------------------ node loss ---
def lose_node2(cluster: dict, fault: str) -> None:
    """killed: every process of node2 (slurmd, the step, the rank) gets SIGKILL, its sockets
    close. silent: node2's network goes down, as when a machine loses power: nothing closes."""
    netns = cluster["netns"][1]
    if fault == "killed":
        pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=True).stdout.split()
        subprocess.run(["kill", "-9", *pids], check=True)
    else:
        subprocess.run(["ip", "-n", netns, "link", "set", "eth0", "down"], check=True)


def bring_back_node2(cluster: dict) -> None:
    """Its network up, and its slurmd started again if it is not running (idempotent)."""
    netns = cluster["netns"][1]
    subprocess.run(["ip", "-n", netns, "link", "set", "eth0", "up"], check=True)
    running = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    if not running:
        subprocess.run([cluster["on"], "node2", "slurmd", "-f", cluster["conf"]], env=cluster["env"], check=True,
                       timeout=60)


def submitit_two_nodes(cluster: dict, s3: dict, url: str, tmp_path: Path, monkeypatch, *overrides: str):
    """launch/submit.py's job (`TrainJob`) on 2 nodes x 1 CPU task, in tmp_path/demo_digits."""
    from ddpm_dist.cli import submit  # what launch/submit.py and ddpm-submit run
    for key in set(os.environ) - set(s3["env"]):
        monkeypatch.delenv(key)  # submitit's sbatch passes this process's environment on
    for key, value in s3["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)
    args = submit.parse_args([
        "--config", "configs/demo_digits.yaml", "--partition", cluster["partition"], "--nodes", "2",
        "--gpus-per-node", "0", "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "10",
        "--folder", str(tmp_path / "submitit"), "--out-root", str(tmp_path), *train_overrides(url), *overrides])
    (job,) = submit.submit(args)
    return job


@pytest.mark.slow
@pytest.mark.parametrize("launcher, fault", [("sbatch", "silent"), ("submitit", "killed")])
def test_a_lost_node_ends_the_survivor_with_its_name_and_the_job_resumes_bitwise(
        launcher, fault, multinode_cluster, multinode_s3, digits_url, one_node_run, tmp_path, monkeypatch):
    """Slurm's node-failure detection stays at its default (SlurmdTimeout=300): the surviving rank
    must end itself within 2 minutes and name the lost peer; the job requeues itself and, once
    node2 is back, resumes from its last checkpoint to the weights of an uninterrupted run.
    launch/train_lsun.sh's job requeues from its script, launch/submit.py's from its tasks.
    (The silent node at train.step_timeout=30 rather than 90: the same path, a minute sooner.)"""
    env = multinode_s3["env"]
    if launcher == "sbatch":
        run_dir = tmp_path / "run"
        job_id = sbatch_two_nodes(multinode_cluster, env, digits_url, run_dir, "train.step_timeout=30")
        log = run_dir / "job.log"
    else:
        job = submitit_two_nodes(multinode_cluster, multinode_s3, digits_url, tmp_path, monkeypatch)
        run_dir, job_id, log = tmp_path / "demo_digits", job.job_id, Path(job.paths.stderr)
    try:
        wait_for("step 10", lambda: (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 10,
                 240, 0.1)
        assert job_field(env, job_id, "NodeList") == "node[1-2]"
        lost_at = time.monotonic()
        lose_node2(multinode_cluster, fault)
        line = wait_for("the survivor's error line", lambda: next(
            (x for x in log.read_text(errors="replace").splitlines() if x.startswith("error: a collective")), None),
            150, 0.5)
        survivor_s = time.monotonic() - lost_at
        bring_back_node2(multinode_cluster)
        # (before the requeued run, whose srun may truncate the log of task 0)
        wait_for("the requeue", lambda: f"requeueing job {job_id}" in log.read_text(errors="replace"), 150, 0.5)
        wait_for("the requeued job to run", lambda: job_field(env, job_id, "Restarts") == "1"
                 and job_field(env, job_id, "JobState") == "RUNNING", 480, 0.5)
        running_again_s = time.monotonic() - lost_at
        state = wait_done(env, job_id, 300)
    finally:
        cancel(env, job_id)
        bring_back_node2(multinode_cluster)
    print(f"{launcher}, node {fault}: survivor exited after {survivor_s:.0f} s, job running again after "
          f"{running_again_s:.0f} s")
    assert survivor_s < 120 and "lost rank 1 on node2" in line, line
    text = log.read_text(errors="replace")
    assert state == "COMPLETED", text[-3000:]
    if launcher == "sbatch":
        assert f"job {job_id} run 2:" in text and "2 tasks on node[1-2]" in text, text[-3000:]
        assert "ddp on 2 x cpu" in text, text[-3000:]
    else:
        assert job.results() == [STEPS, STEPS]
    resumed_at = int(text.split("resumed from")[1].split("at step")[1].split()[0])
    assert resumed_at == 8
    assert_same_training(run_dir, one_node_run)


# ------------------------------------------------------------------- the reproduction chain ---
CHAIN_STEPS = ("train.total_steps=6",)

@pytest.mark.slow
def test_the_chain_on_two_nodes_trains_on_both_2x2_bitwise_and_evaluates_over_both(
        multinode_cluster, tmp_path):
    """launch/reproduce.py --nodes 2: training on 2 nodes x 2 tasks (4 ranks, bit for bit the
    same as 4 ranks on one machine), sampling/FID and bits/dim with one rank on each node, and the
    report at the end."""
    from test_reproduce import _image_folders, _submitted
    from test_sampling import _random_inception
    cluster, env = multinode_cluster, multinode_cluster["env"]
    train, test = _image_folders(tmp_path / "raw", train=32, test=4)  # the reference statistics: 32 Inception passes
    weights = _random_inception(tmp_path / "inception.pth")
    shards, run = tmp_path / "shards", tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch" / "reproduce.py"), "configs/demo_digits.yaml", *TINY, *CHAIN_STEPS,
           f"out_dir={run}", f"data.source={shards}", "--dataset", "folder", "--raw", str(train), "--raw-test", str(test),
           "--raw-dir", str(tmp_path / "raw"), "--inception-weights", str(weights), "--num-samples", "16", "--seeds", "1",
           "--nll-images", "4", "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1",
           "--eval-world-size", "2", "--partition", cluster["partition"], "--time", "10", "--eval-time", "10"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _submitted(proc.stdout)
    assert list(jobs) == ["prepare", "train", "export", "fid", "nll", "report"], proc.stdout
    try:
        state = wait_done(env, jobs["report"], 900)
    finally:
        for job_id in jobs.values():
            cancel(env, job_id)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((run / "slurm").glob("*_log.err")))
    assert state == "COMPLETED", logs
    for stage in ("train", "fid", "nll"):
        assert job_field(env, jobs[stage], "NodeList") == "node[1-2]", stage
    assert job_field(env, jobs["train"], "NumTasks") == "4"
    fid = json.loads((run / "eval" / "fid16" / "result.json").read_text())
    nll = json.loads((run / "eval" / "nll.json").read_text())
    report = json.loads((run / "report.json").read_text())
    assert fid["world_size"] == nll["world_size"] == 2 and report["training"]["steps"] == 6
    assert report["ours"]["fid"] == fid["fid"] and math.isfinite(fid["fid"])
    assert report["ours"]["bits_per_dim"] == nll["bits_per_dim"] > 0
    here = eval_tool(env, "eval_nll.py", "--ckpt", run / "model_ema.safetensors", "--data", f"{shards}-test",
                     "--num-images", 4, "--device", "cpu", "--world-size", 1, "--out", tmp_path / "nll-here.json")
    assert json.loads((tmp_path / "nll-here.json").read_text())["bits_per_dim"] == nll["bits_per_dim"], here.stdout
    four_ranks = train_on_one_node(tmp_path / "four-ranks", env, str(shards), *CHAIN_STEPS, ranks=4)
    assert_same_training(run, four_ranks, 6)

