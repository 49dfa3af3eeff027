"""One writer per run folder, and a run folder that keeps what it has: the lock, what resume
compares, the final checkpoint before the final sample grid."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import ROOT, TINY, losses, run_train, wait_for_step


def test_the_final_checkpoint_is_written_before_the_final_sample_grid(tmp_path):
    run = tmp_path / "run"
    code, err = run_train(run, "train.total_steps=4", "train.sample_every=4")
    assert code == 0, err[-2000:]
    manifest = run / "checkpoints" / "step_00000004" / "manifest.json"
    assert manifest.stat().st_mtime_ns <= (run / "samples" / "step_00000004.png").stat().st_mtime_ns

    # num_samples=0: no sample grids; the run ends normally with its final checkpoint
    other = tmp_path / "no_grids"
    code, err = run_train(other, "train.total_steps=4", "train.num_samples=0")
    assert code == 0, err[-2000:]
    assert (other / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    assert not (other / "samples").exists()
