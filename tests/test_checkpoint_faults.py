"""Checkpoints under faults, with real files and real processes: a crafted `.metadata` runs no
code, a damaged newest checkpoint falls back to the previous one, a failed save keeps the older
ones and exits 5, the NaN guard keeps the good checkpoints, a rejected run keeps config.yaml."""
import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm_dist.config import ConfigError, load_config
from ddpm_dist.modelio.model_file import read_model_file
from ddpm_dist.modelio.source import export_checkpoint
from test_train import ROOT, losses, run_train


class _WritesFile:
    """Unpickling this calls open(path, "w"): it creates a file, as a crafted checkpoint could."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def craft_metadata(step_dir: Path, marker: Path) -> None:
    """Replace `.metadata` by a pickle that writes `marker`, and make the manifest (if any) agree,
    sizes and hashes, as an attacker who controls the folder would."""
    data = pickle.dumps(_WritesFile(marker))
    (step_dir / ".metadata").write_bytes(data)
    manifest = step_dir / "manifest.json"
    if manifest.is_file():
        content = json.loads(manifest.read_text())
        content["files"][".metadata"] = len(data)
        content["sha256"][".metadata"] = hashlib.sha256(data).hexdigest()
        manifest.write_text(json.dumps(content))


def run_tool(script: str, *args):
    proc = subprocess.run([sys.executable, f"tools/{script}", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    return proc.returncode, proc.stderr


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def step_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_crafted_metadata_is_refused_by_resume_export_and_sampling(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    assert run_train(run, "train.total_steps=4")[0] == 0
    craft_metadata(run / "checkpoints" / "step_00000004", marker)

    code, err = run_train(run, "train.total_steps=8")
    assert code == 2 and last_line(err).startswith("error: ") and ".metadata" in last_line(err), err[-2000:]
    assert "Traceback" not in err and not marker.exists()

    code, err = run_tool("export.py", run, "--out", tmp_path / "m.safetensors")
    assert code == 2 and last_line(err).startswith("error: ") and ".metadata" in last_line(err), err[-2000:]
    assert not marker.exists()

    code, err = run_tool("fid_sample.py", "--ckpt", run / "checkpoints" / "step_00000004", "--num-samples", 1,
                         "--out", tmp_path / "samples")
    assert code != 0 and last_line(err).startswith("fid_sample.py: error: "), err[-2000:]
    assert "Traceback" not in err and not marker.exists()


@pytest.mark.parametrize("name, content", [("bad.safetensors", b"\x07" * 64), ("bad.pt", b"not a zip file"),
                                           ("list.pt", None)])
def test_malformed_model_files_give_one_line(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        torch.save([1, 2, 3], path)  # a valid torch file that is not a model file
    else:
        path.write_bytes(content)
    code, err = run_tool("fid_sample.py", "--ckpt", path, "--num-samples", 1, "--out", tmp_path / "samples")
    assert code != 0 and last_line(err).startswith("fid_sample.py: error: ") and name in last_line(err), err
    assert "Traceback" not in err


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    assert run_train(straight, "train.total_steps=16")[0] == 0
    assert run_train(damaged, "train.total_steps=12")[0] == 0
    assert step_dirs(damaged) == ["step_00000008", "step_00000012"]
    shard = damaged / "checkpoints" / "step_00000012" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a torn write

    code, err = run_train(damaged, "train.total_steps=16")
    assert code == 0, err[-2000:]
    assert "step_00000012" in err and "resumed from" in err and "step_00000008 at step 8" in err
    a, b = losses(straight), losses(damaged)
    assert [a[s] for s in range(1, 17)] == [b[s] for s in range(1, 17)]  # bitwise on CPU
    export_checkpoint(straight, tmp_path / "a.safetensors")
    export_checkpoint(damaged, tmp_path / "b.safetensors")
    wa, wb = read_model_file(tmp_path / "a.safetensors")[0], read_model_file(tmp_path / "b.safetensors")[0]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_no_verifying_checkpoint_stops_with_one_line(tmp_path):
    run = tmp_path / "run"
    assert run_train(run, "train.total_steps=8")[0] == 0
    for step_dir in (run / "checkpoints").iterdir():
        (step_dir / "rank0.json").unlink()
    code, err = run_train(run, "train.total_steps=12")
    assert code == 2 and last_line(err).startswith("error: ") and "rank0.json" in last_line(err), err[-2000:]


def assert_failed_save(run: Path, code: int, err: str, reason: str) -> None:
    assert code == 5, err[-2000:]
    line = last_line(err)
    assert line.startswith("error: could not save checkpoint") and reason in line, line
    assert "Traceback" not in err
    assert not list((run / "checkpoints").glob("*.partial"))
    assert (run / "checkpoints" / "step_00000004" / "manifest.json").is_file()


def test_failed_save_exits_5_and_keeps_the_older_checkpoints(tmp_path):
    run = tmp_path / "run"
    assert run_train(run, "train.total_steps=4")[0] == 0
    (run / "checkpoints" / "step_00000008").write_text("a file where the step folder goes")
    code, err = run_train(run, "train.total_steps=8")
    assert_failed_save(run, code, err, "step_00000008")
    assert run_train(run, "train.total_steps=4")[0] == 0  # the kept checkpoint still resumes


def test_full_filesystem_exits_5_and_keeps_the_older_checkpoints(tmp_path):
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    # Room for one checkpoint of the tiny model (about 12 MB), not two.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(ckpts)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        code, err = run_train(run, "train.total_steps=8")
        assert_failed_save(run, code, err, "MiB free there")  # torch.save's zip writer hides ENOSPC
    finally:
        subprocess.run(["umount", str(ckpts)], check=True)


def test_keep_last_below_one_is_refused():
    with pytest.raises(ConfigError, match=r"^train.keep_last: must be at least 1, got 0"):
        load_config("configs/demo_digits.yaml", ["train.keep_last=0"])


def test_nan_guard_keeps_the_good_checkpoints(tmp_path):
    run = tmp_path / "run"
    assert run_train(run, "train.total_steps=8")[0] == 0
    # A learning rate beyond float32's range makes step 9's update non-finite (an infinite one is
    # refused as a setting); the change of settings on resume must be allowed.
    code, err = run_train(run, "train.total_steps=40", "optim.lr=1e300", "train.allow_config_change=true")
    assert code == 2 and "non-finite" in last_line(err), err[-2000:]
    names = step_dirs(run)
    assert len(names) == 3 and names[1:] == ["step_00000004", "step_00000008"], names
    assert names[0].startswith("nonfinite_step_"), names
    code, err = run_train(run, "train.total_steps=10")
    assert code == 0 and "step_00000008 at step 8" in err, err[-2000:]


def test_rejected_run_keeps_the_run_config(tmp_path):
    run = tmp_path / "run"
    assert run_train(run, "train.total_steps=4")[0] == 0
    before = (run / "config.yaml").read_bytes()
    code, err = run_train(run, "train.total_steps=8", "model.ch=64")
    assert code == 2 and "was written with model.ch=32" in last_line(err)
    assert (run / "config.yaml").read_bytes() == before
