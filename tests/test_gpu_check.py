"""bench/gpu_check.sh --smoke: the GPU check's code paths run on the CPU in the order of the goals,
its JSON has every section, every entry with a status, a positive training rate through the real
loop, and children.log the tail of every child's log; --rest runs what a first call skipped."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402  (bench/ is a folder of scripts, not a package)

GOALS = ["env", "train cifar10 single compiled", "diffusers cifar10 compiled", "train celebahq single compiled",
         "sample cifar10 batch auto compiled"]


def run_check(tmp_path: Path, *args: str, budget: str = "60") -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": budget,
           "GPU_CHECK_LAST": str(tmp_path / "last.json")}
    return subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_smoke_run_writes_every_section_in_the_order_of_the_goals(tmp_path):
    proc = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    report = json.loads((out / "gpu_check.json").read_text())
    assert report == json.loads((tmp_path / "last.json").read_text())
    assert report["env"]["status"] == "ok" and report["env"]["torch"]
    for section in ("groupnorm", "train", "diffusers", "sampling"):
        assert report[section], section
        assert all(isinstance(e["status"], str) and e["status"] for e in report[section]), section
    names = {e["name"] for e in report["train"]}
    assert {f"train {m} {e} {c}" for m in ("cifar10", "celebahq") for e in ("single", "ddp", "fsdp")
            for c in ("eager", "compiled")} == names
    progress = re.compile(r"^(.+?): .* \([\d.]+ s\)$")  # run_all's line per check, in the order run
    ran = [m[1] for m in map(progress.match, (out / "gpu_check.log").read_text().splitlines()) if m]
    assert ran[:len(GOALS)] == GOALS and ran == [c.name for c in gpu_check.plan()]
    eager = next(e for e in report["train"] if e["name"] == "train cifar10 single eager")
    assert eager["status"] == "ok" and eager["images_per_s"] > 0 and eager["first_log_s"] > 0, eager
    tails = (out / "children.log").read_text()
    for entry in [report["env"], *(e for s in gpu_check.SECTIONS[1:] for e in report[s])]:
        if not entry["status"].startswith("skipped"):
            assert f"===== {entry['name']}: {entry['status']}" in tails, entry["name"]
    assert "compile times" in tails.split("===== groupnorm")[1].split("=====")[0]
    assert "| measurement |" in (out / "gpu_check.txt").read_text()


def test_the_second_call_runs_what_the_first_skipped_and_keeps_the_rest(tmp_path):
    first = {"env": {"name": "env", "status": "ok"}, "groupnorm": [{"name": "groupnorm channels_last",
                                                                    "status": "skipped: over budget"}],
             "train": [{"name": "train cifar10 single compiled", "status": "ok", "images_per_s": 9000.0, "batch": 128}],
             "diffusers": [], "sampling": []}
    (tmp_path / "last.json").write_text(json.dumps(first))
    proc = run_check(tmp_path, "--rest", "--only", "groupnorm", "train cifar10 single compiled")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["env"]["status"] == "ok" and report["env"]["torch"]
    assert report["groupnorm"][0]["status"] == "ok", report["groupnorm"]
    assert report["train"] == first["train"], "what the first call measured is kept, not rerun"
    assert report == json.loads((tmp_path / "last.json").read_text())


def test_rest_selects_the_skipped_and_the_never_reached_in_plan_order():
    checks = gpu_check.plan()
    last = {"train": [{"name": "train cifar10 single compiled", "status": "ok"},
                      {"name": "train celebahq single compiled", "status": "skipped: over budget"},
                      {"name": "train cifar10 single eager", "status": "error: exit status 1"}],
            "diffusers": [{"name": "diffusers cifar10 compiled", "status": "ok"}], "sampling": []}
    rest = [c.name for c in gpu_check.rest_of(checks, last)]
    assert rest[:3] == ["env", "train celebahq single compiled", "sample cifar10 batch auto compiled"]
    assert "train cifar10 single compiled" not in rest and "train cifar10 single eager" not in rest
    assert len(rest) == len(checks) - 3


def test_rest_without_a_first_report_says_what_to_do(tmp_path):
    proc = run_check(tmp_path, "--rest")
    assert proc.returncode != 0
    assert "--rest: no report at" in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr
