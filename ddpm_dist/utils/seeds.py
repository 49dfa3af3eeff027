"""The one way random streams are seeded: numpy's SeedSequence over integer keys.

A key tuple names a stream, e.g. (run seed, step, rank, purpose) for one training step's
dropout, or (seed, sample index) for one sample. SeedSequence hashes the whole tuple, so nearby
tuples such as (0, 1) and (1, 0) give unrelated streams, and two purposes never share one.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np


class Purpose(IntEnum):
    """The last key of a training-side stream: what the numbers are for."""
    DROPOUT = 1          # torch's global generator during a step's forward passes
    DIFFUSION = 2        # t ~ U{1..T} and ε ~ N(0, I) of a step
    SAMPLE_GRID = 3      # the EMA sample grids shown during training
    EPOCH_ORDER = 4      # the data order of an epoch (in-memory data)
    FLIPS = 5            # random horizontal flips (in-memory data)


def seed_sequence(*keys: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(k) for k in keys])


def derive_seed(*keys: int) -> int:
    """A 64-bit seed (for torch.Generator.manual_seed) of the stream named by `keys`."""
    return int(seed_sequence(*keys).generate_state(1, np.uint64)[0])


def numpy_rng(*keys: int) -> np.random.Generator:
    """A numpy generator of the stream named by `keys`."""
    return np.random.default_rng(seed_sequence(*keys))
