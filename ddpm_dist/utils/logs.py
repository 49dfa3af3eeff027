"""Rank-prefixed log lines: `12:00:01 [rank 0] message` on stderr."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("ddpm_dist")


def setup_logging(rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Log lines look like `12:00:01 [rank 0] message`; every rank logs warnings, rank 0 all."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level if rank == 0 else logging.WARNING)
    log.propagate = False
    return log
