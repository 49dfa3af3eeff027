"""FID during training, off its critical path: a watcher over a run's checkpoints.

For each new `RUN/checkpoints/step_N`, it exports the EMA weights, has them sampled and scored
(by the `SampleAndScore` the tool gives it: tools/track_fid.py runs tools/fid_sample.py as a
process of its own, on Slurm a job of its own), and writes
`eval/fid<K>` and `eval/is<K>` at step N into the run's TensorBoard (its own event file in
the run folder) and into RUN/eval/track/fid<K>.jsonl. Training never waits for it. A failed evaluation
leaves the run untouched: the watcher logs one line, tries that step once more, then moves on. Everything it writes is under RUN/eval/track/ and its event file.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ddpm_dist.modelio.source import export_checkpoint
from ddpm_dist.training.checkpoint import checkpoint_config, complete_checkpoints, step_of
from ddpm_dist.training.telemetry import events_dir

log = logging.getLogger(__name__)
ATTEMPTS = 2  # per checkpoint

# (model file, samples folder): sample and score the model, leaving the folder's result.json
# (fid, inception_score, weights_sha256); raise RuntimeError with one line if that fails.
SampleAndScore = Callable[[Path, Path], None]


def track_folder(run: Path) -> Path:
    """Everything the watcher writes: its exports and samples per step, and fid<K>.jsonl."""
    return Path(run) / "eval" / "track"


@dataclass(frozen=True)
class Tracker:
    run: Path
    num_samples: int
    sample_and_score: SampleAndScore
    keep_samples: bool = False

    @property
    def tag(self) -> str:
        """10000 → "10k": the TensorBoard names eval/fid10k, eval/is10k."""
        n = self.num_samples
        return f"{n // 1000}k" if n % 1000 == 0 else str(n)

    @property
    def folder(self) -> Path:
        return track_folder(self.run)

    @property
    def results(self) -> Path:
        return self.folder / f"fid{self.tag}.jsonl"

    def evaluated(self) -> dict[int, dict]:
        if not self.results.is_file():
            return {}
        rows = (json.loads(line) for line in self.results.read_text().splitlines() if line.strip())
        return {row["step"]: row for row in rows}

    def evaluate(self, checkpoint: Path, step: int) -> dict:
        """Export, sample and score one checkpoint; raises RuntimeError with one line."""
        out = self.folder / f"step_{step:08d}"
        model = out / "model_ema.safetensors"
        if not model.is_file():
            export_checkpoint(checkpoint, model)
        try:
            self.sample_and_score(model, out / "samples")
        except RuntimeError as err:
            raise RuntimeError(f"step {step}: {err}") from None
        result = json.loads((out / "samples" / "result.json").read_text())
        row = {"step": step, "fid": result.get("fid"), "inception_score": result.get("inception_score"),
               "num_samples": self.num_samples, "weights_sha256": result["weights_sha256"]}
        if not self.keep_samples:  # N PNGs per checkpoint add up; the scores and statistics stay
            for png_folder in (out / "samples").glob("[0-9]" * 6):
                shutil.rmtree(png_folder)
        return row

    def record(self, row: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(str(events_dir(self.run)), filename_suffix=".track_fid") as tb:
            if row["fid"] is not None:
                tb.add_scalar(f"eval/fid{self.tag}", row["fid"], global_step=row["step"])
            tb.add_scalar(f"eval/is{self.tag}", row["inception_score"], global_step=row["step"])
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.results, "a") as f:
            f.write(json.dumps(row) + "\n")


def final_step(run: Path) -> int:
    return checkpoint_config(run).train.total_steps


def watch(tracker: Tracker, *, poll_s: float, once: bool, max_idle_s: float) -> int:
    """Evaluate checkpoints as they appear until the run's last step is evaluated (or, with
    `once`, those there now). Stops after `max_idle_s` without a new checkpoint. Returns the
    number of checkpoints whose evaluation failed ATTEMPTS times in a row."""
    failed: set[int] = set()
    idle_since = time.monotonic()
    while True:
        done = tracker.evaluated()
        steps = [(step_of(c), c) for c in complete_checkpoints(tracker.run / "checkpoints")]
        for step, checkpoint in [(s, c) for s, c in steps if s not in done and s not in failed]:
            idle_since = time.monotonic()
            if not _evaluate_with_retry(tracker, checkpoint, step):
                failed.add(step)
        if once or _finished(tracker, tracker.evaluated(), failed):
            return len(failed)
        if time.monotonic() - idle_since > max_idle_s:
            log.warning("no new checkpoint for %.0f s: stopping", max_idle_s)
            return len(failed)
        time.sleep(poll_s)


def _evaluate_with_retry(tracker: Tracker, checkpoint: Path, step: int) -> bool:
    for attempt in range(1, ATTEMPTS + 1):
        try:
            row = tracker.evaluate(checkpoint, step)
        except (RuntimeError, ValueError, FileNotFoundError) as err:  # a failed job, a rotated checkpoint
            log.warning("evaluation failed (attempt %d of %d): %s", attempt, ATTEMPTS, err)
            continue
        tracker.record(row)
        log.info("step %d: fid%s %s, is%s %.3f", step, tracker.tag, row["fid"], tracker.tag, row["inception_score"])
        return True
    return False


def _finished(tracker: Tracker, evaluated: dict, failed: set[int]) -> bool:
    """The last step's checkpoint is evaluated (or failed for good)."""
    if not (tracker.run / "config.yaml").is_file():
        return False
    last = final_step(tracker.run)
    return last in evaluated or last in failed
