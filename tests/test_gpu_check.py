"""bench/gpu_check.sh --smoke: the GPU check's code paths run on the CPU and its JSON has every
section, every entry with a status, and a positive training rate through the real loop."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_writes_every_section(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "60"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["env"]["status"] == "ok" and report["env"]["torch"]
    for section in ("groupnorm", "train", "diffusers", "sampling"):
        assert report[section], section
        assert all(isinstance(e["status"], str) and e["status"] for e in report[section]), section
    names = {e["name"] for e in report["train"]}
    assert {f"train {m} {e} {c}" for m in ("cifar10", "celebahq") for e in ("single", "ddp", "fsdp")
            for c in ("eager", "compiled")} == names
    first = report["train"][0]
    assert first["name"] == "train cifar10 single eager" and first["status"] == "ok", first
    assert first["images_per_s"] > 0
    assert "| measurement |" in (tmp_path / "gpu_check.txt").read_text()
