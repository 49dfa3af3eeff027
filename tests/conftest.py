"""Shared pytest fixtures. Each section belongs to one concern; keep them small."""
from __future__ import annotations

import os

# Each test process and every rank it spawns uses one intra-op thread: 2-core CI machines
# otherwise oversubscribe when two ranks run at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
