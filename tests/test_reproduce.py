"""The reproduction chain (launch/reproduce.py) on the real single-node Slurm cluster, small:
raw image folders → shards → 2-rank training → export → FID/IS on 2 ranks → bits/dim → report."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_slurm import REPO, TINY, job_env, wait_done

pytestmark = pytest.mark.slurm

STEPS = 8


def _image_folders(root: Path, train: int = 100, test: int = 8) -> tuple[Path, Path]:
    """`train` training and `test` held-out digits as PNG files, the raw data a user brings."""
    from ddpm_dist.data.digits import load_digits_images
    images = load_digits_images(16).permute(0, 2, 3, 1).numpy()
    folders = root / "train", root / "test"
    for folder, indices in zip(folders, (range(train), range(train, train + test))):
        folder.mkdir(parents=True)
        for i in indices:
            Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
    return folders


def _reproduce(cluster: dict, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    from test_sampling import _random_inception
    weights = tmp_path / "inception.pth"
    if not weights.exists():
        _random_inception(weights)
    train, test = tmp_path / "raw" / "train", tmp_path / "raw" / "test"
    cmd = [sys.executable, str(REPO / "launch" / "reproduce.py"), "configs/demo_digits.yaml", *TINY,
           f"train.total_steps={STEPS}", f"out_dir={tmp_path / 'run'}", f"data.source={tmp_path / 'shards'}",
           "--dataset", "folder", "--raw", str(train), "--raw-test", str(test), "--raw-dir", str(tmp_path / "raw"),
           "--inception-weights", str(weights), "--num-samples", "60", "--seeds", "2", "--nll-images", "8",
           "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1", "--eval-world-size", "2",
           "--partition", cluster["SLURM_TEST_PARTITION"], "--time", "10", "--eval-time", "10", *extra]
    return subprocess.run(cmd, cwd=REPO, env=job_env(cluster), capture_output=True, text=True, timeout=600)


def _submitted(out: str) -> dict[str, str]:
    """{stage: job id} from the lines `<stage>: submitted job <id> ...`."""
    return {line.split(":")[0]: line.split()[3] for line in out.splitlines() if ": submitted job " in line}


def test_the_chain_ends_with_a_report_of_the_real_stages_and_a_rerun_does_nothing(slurm_cluster, tmp_path):
    _image_folders(tmp_path / "raw")
    first = _reproduce(slurm_cluster, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = _submitted(first.stdout)
    assert list(jobs) == ["prepare", "train", "export", "fid", "nll", "report"], first.stdout
    try:
        state = wait_done(jobs["report"], 900)
    finally:
        subprocess.run(["scancel", *jobs.values()], capture_output=True)
    run = tmp_path / "run"
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((run / "slurm").glob("*_log.err")))
    assert state == "COMPLETED", logs
    report = json.loads((run / "report.json").read_text())
    fid = json.loads((run / "eval" / "fid60" / "result.json").read_text())
    nll = json.loads((run / "eval" / "nll.json").read_text())
    assert report["ours"]["fid"] == fid["fid"] and np.isfinite(fid["fid"]) and len(fid["runs"]) == 2
    assert report["ours"]["inception_score"] == fid["inception_score"]
    assert report["ours"]["bits_per_dim"] == nll["bits_per_dim"] > 0 and nll["num_images"] == 8
    assert report["training"]["steps"] == STEPS and report["training"]["device_hours"] > 0
    assert fid["weights_sha256"] == nll["weights_sha256"] == report["evaluation"]["weights_sha256"]
    md = (run / "report.md").read_text()
    assert f"{fid['fid']:.2f} ± {fid['fid_std']:.2f}" in md and f"{nll['bits_per_dim']:.2f}" in md
    pictures = re.findall(r"<img class='\w+' src='([^']+)'", (run / "report.html").read_text())
    assert pictures == ["report/samples.png", "report/loss.png"]  # no FID watcher ran: no FID plot
    assert all((run / p).is_file() and f"]({p})" in md for p in pictures)

    # reproduce.lock is the chain's lock: every invocation holds it while it looks at the queue
    written = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "reproduce.lock"}
    second = _reproduce(slurm_cluster, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert not _submitted(second.stdout), second.stdout
    assert [line.split(":")[0] for line in second.stdout.splitlines() if line.endswith(": done")] == \
        ["prepare", "train", "export", "fid", "nll", "report"]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "reproduce.lock"} == written


def test_prepare_here_then_a_rerun_while_the_chain_is_queued_submits_nothing_twice(slurm_cluster, tmp_path):
    _image_folders(tmp_path / "raw")
    partition = f"PartitionName={slurm_cluster['SLURM_TEST_PARTITION']}"
    subprocess.run(["scontrol", "update", partition, "State=DOWN"], check=True)  # jobs queue, none starts
    try:
        first = _reproduce(slurm_cluster, tmp_path, "--prepare-here")
        second = _reproduce(slurm_cluster, tmp_path)
    finally:
        subprocess.run(["scontrol", "update", partition, "State=UP"], check=True)
        jobs = _submitted(first.stdout)
        subprocess.run(["scancel", *jobs.values()], capture_output=True)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    assert [line for line in first.stdout.splitlines() if line.startswith("prepare:")] == \
        ["prepare: running here", "prepare: done"], first.stdout
    assert (tmp_path / "run" / "eval" / "reference_train.npz").is_file()
    assert list(jobs) == ["train", "export", "fid", "nll", "report"] and not _submitted(second.stdout)
    for stage, job_id in jobs.items():
        assert f"{stage}: already queued as job {job_id}" in second.stdout


def test_a_cifar10_archive_that_is_not_the_official_one_is_refused(tmp_path):
    import io
    import tarfile
    fake = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        member = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        member.size = 3
        tar.addfile(member, io.BytesIO(b"abc"))
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "reproduce.py"), "configs/cifar10.yaml",
                           f"data.source={tmp_path / 'shards'}", f"out_dir={tmp_path / 'run'}", "--raw", str(fake),
                           "--raw-dir", str(tmp_path / "raw"), "--inception-weights", str(fake), "--stage", "prepare"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"reproduce: error: {fake}: sha256 ") and "is not the official archive's" in last
    assert not (tmp_path / "raw" / "cifar-10-batches-py").exists() and not (tmp_path / "shards").exists()


@pytest.mark.parametrize("args, message", [
    (["configs/demo_digits.yaml", "--dataset", "imagenet"], "no dataset recipe for 'imagenet'; pass --dataset one of"),
    (["configs/lsun_church.yaml"], "lsun_church: pass --raw, the church_outdoor_train_lmdb folder"),
    (["configs/cifar10.yaml", "--raw-test", "x"], "--raw-test is for image-folder datasets"),
    (["configs/cifar10.yaml", "--nodes", "2", "--eval-world-size", "3"],
     "evaluation runs on the 2 training node(s): --eval-world-size 3 must be --nodes 2 times"),
])
def test_a_wrong_setting_is_one_line_before_anything_is_submitted(args, message):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "reproduce.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"reproduce: error: {message}"), line


def test_requires_python_admits_only_pythons_with_tarfile_filters():
    """prepare extracts CIFAR-10 with `extractall(filter="data")`: 3.10.12+, 3.11.4+, 3.12+."""
    import re

    from packaging.specifiers import SpecifierSet
    line = re.search(r'^requires-python = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    spec = SpecifierSet(line.group(1))
    assert [v for v in ("3.10.11", "3.11.0", "3.11.3") if v in spec] == []
    assert all(v in spec for v in ("3.10.12", "3.11.4", "3.12.0", "3.13.1"))


def test_a_stage_job_reads_the_settings_resolved_at_submission_not_the_edited_yaml(tmp_path):
    """prepare and report run this command again in their own jobs, maybe hours later: they
    read the settings the chain resolved when it submitted them, as the training job does."""
    from ddpm_dist.cli.reproduce import build_plan, parse_args, stage_job
    config = tmp_path / "demo_digits.yaml"
    config.write_text((REPO / "configs" / "demo_digits.yaml").read_text())
    argv = [str(config), *TINY, f"out_dir={tmp_path / 'run'}", "--dataset", "folder", "--raw", str(tmp_path)]
    plan = build_plan(parse_args(argv))
    jobs = {stage: stage_job(plan, stage, argv) for stage in ("prepare", "report")}
    config.write_text(config.read_text().replace("lr: 1.0e-3", "lr: 0.5").replace("flip: false", "flip: true"))
    assert build_plan(parse_args(argv)).cfg.optim.lr == 0.5  # what a job reading the YAML file would get
    for stage, (module, args) in jobs.items():
        assert module == "ddpm_dist.cli.reproduce" and args[args.index("--stage") + 1] == stage
        assert build_plan(parse_args(args)) == plan
