"""tools/track_fid.py: FID of each checkpoint as it appears, in the run's TensorBoard, evaluated
as Slurm jobs of their own on the real test cluster while the run trains."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_slurm import REPO, TINY, job_env

STEPS = 8
TRAIN = [*TINY, "engine=single", f"train.total_steps={STEPS}", "train.keep_last=3"]


def _watcher(run: Path, tmp_path: Path, *extra: str, env=None, ref_stats: Path | None = None) -> subprocess.Popen:
    from ddpm_dist.metrics.stats import save_stats
    from test_sampling import _random_inception
    weights, stats = tmp_path / "inception.pth", tmp_path / "ref.npz"
    if not weights.exists():
        _random_inception(weights)
        save_stats(stats, np.zeros(2048), np.eye(2048))
    cmd = [sys.executable, str(REPO / "tools" / "track_fid.py"), str(run), "--num-samples", "12",
           "--ref-stats", str(ref_stats or stats), "--inception-weights", str(weights), "--steps", "5", "--batch-size", "6",
           "--device", "cpu", "--poll", "0.5", "--max-idle-min", "5", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train(run: Path, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ddpm_dist.train", "--config", "configs/demo_digits.yaml",
                             f"out_dir={run}", *TRAIN], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _tensorboard_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run))  # the event files are in the run folder
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


@pytest.mark.slurm
def test_each_checkpoint_becomes_a_tensorboard_point_from_its_own_slurm_job(slurm_cluster, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # the watcher may start before the run does
    env = job_env(slurm_cluster)
    watcher = _watcher(run, tmp_path, "--launcher", "slurm", "--world-size", "2", "--gpus-per-node", "0",
                       "--cpus-per-task", "1", "--partition", slurm_cluster["SLURM_TEST_PARTITION"],
                       "--timeout-min", "10", env=env)
    trainer = _train(run, env)
    try:
        _, train_err = trainer.communicate(timeout=300)
        out, err = watcher.communicate(timeout=600)
    finally:
        for proc in (trainer, watcher):
            proc.kill()
    assert trainer.returncode == 0, train_err[-3000:]
    assert watcher.returncode == 0, err[-3000:]
    points = _tensorboard_scalars(run, "eval/fid12")
    assert [step for step, _ in points] == [4, 8] and all(np.isfinite(v) for _, v in points)
    rows = [json.loads(line) for line in (run / "eval" / "track" / "fid12.jsonl").read_text().splitlines()]
    assert [(r["step"], r["fid"]) for r in rows] == [(s, pytest.approx(v)) for s, v in points]
    assert [s for s, _ in _tensorboard_scalars(run, "eval/is12")] == [4, 8]
    for step in (4, 8):  # each evaluation ran as a Slurm job of its own, with 2 tasks
        assert len(list((run / "eval" / "track" / f"step_{step:08d}" / "samples" / "slurm").glob("*_log.out"))) == 2
    assert err.count("submitted Slurm job") == 2
    assert not list((run / "eval" / "track").glob("step_*/samples/000000"))  # PNGs removed once scored


def test_a_failing_evaluation_leaves_the_run_untouched_and_ends_the_watcher(tmp_path):
    run = tmp_path / "run"
    trainer = _train(run)
    _, train_err = trainer.communicate(timeout=300)
    assert trainer.returncode == 0, train_err[-3000:]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    broken = tmp_path / "broken.npz"
    np.savez(broken, something=np.zeros(3))
    watcher = _watcher(run, tmp_path, "--launcher", "local", "--once", ref_stats=broken)
    _, err = watcher.communicate(timeout=600)
    assert watcher.returncode == 1, err[-3000:]
    failures = [line for line in err.splitlines() if "evaluation failed (attempt" in line]
    assert len(failures) == 2 * 2, err[-3000:]  # two checkpoints (steps 4, 8), two attempts each
    assert all("--ref-stats" in line and "not an .npz with mu and sigma" in line for line in failures)
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and "eval" not in p.relative_to(run).parts}
    assert after == before  # no checkpoint, metric or event file of the run changed, none added
