"""Rank-prefixed log lines and the run's metrics: TensorBoard scalars/images plus a JSONL copy
(`metrics.jsonl`) that scripts and tests read without TensorBoard."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger("ddpm_dist")


def setup_logging(rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Log lines look like `12:00:01 [rank 0] message`; every rank logs warnings, rank 0 all."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level if rank == 0 else logging.WARNING)
    log.propagate = False
    return log


class MetricsWriter:
    """TensorBoard + JSONL on rank 0; a no-op elsewhere. Import of tensorboard is deferred so the
    core does not need it."""

    def __init__(self, out_dir: str | Path, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir = Path(out_dir)
        self.tb = SummaryWriter(str(self.out_dir / "tb"))
        self.jsonl = open(self.out_dir / "metrics.jsonl", "a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.tb.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def image(self, step: int, name: str, grid: torch.Tensor) -> None:
        """grid: uint8 [C, H, W]; TensorBoard stores C=1 (grey) as grey RGB."""
        if self.enabled:
            self.tb.add_image(name, grid, step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()
