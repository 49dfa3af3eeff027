"""The periodic grid of EMA samples during training, computed once over all ranks.

The grid's noise is one stream: a generator seeded by (seed, SAMPLE_GRID) that draws the whole
[N, C, H, W] batch for x_T and for every step (Algorithm 2 on the batch). Each rank draws that
whole noise (cheap next to the network) and keeps rows r, r+W, …, so the network runs on
ceil(N/W) rows per rank instead of N, and the grid holds the values one process computing all N
rows gets. Every rank makes the same calls with the same row count (a rank with fewer rows
repeats one), as sharded engines need (each forward gathers weights collectively); the uint8
rows are all-gathered and rank 0 puts them back in order.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ddpm_dist.distributed import DistInfo, rank_split
from ddpm_dist.images import to_uint8


class RowsOfOneStream:
    """A noise source for `p_sample_loop`: each draw takes the next [total, ...] tensor from
    `generator`, as sampling all rows at once would, and returns the given rows of it."""

    def __init__(self, generator: torch.Generator, total: int, rows: Sequence[int], device):
        self.generator, self.total, self.device = generator, total, device
        self.rows = torch.tensor(list(rows), dtype=torch.long, device=device)

    def draw(self, shape: Sequence[int]) -> torch.Tensor:
        assert shape[0] == len(self.rows), f"{len(self.rows)} rows for a batch of {shape[0]}"
        whole = torch.randn(self.total, *shape[1:], generator=self.generator, device=self.device)
        return whole[self.rows]


def grid_rows(n: int, rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s rows of an n-sample grid, padded to ceil(n/W) by repeating its last (row 0
    for a rank with none): every rank runs the same batch shape."""
    rows = list(rank_split(range(n), rank, world_size)) or [0]
    return rows + rows[-1:] * (math.ceil(n / world_size) - len(rows))


def _gather_rows(mine: torch.Tensor, n: int, world_size: int) -> torch.Tensor:
    """All ranks' [k, C, H, W] rows → the [n, C, H, W] grid in order (row i from rank i % W)."""
    if world_size == 1:
        return mine[:n]
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    return torch.stack([every[i % world_size][i // world_size] for i in range(n)])


def sample_grid(model, diffusion, shape: Sequence[int], seed: int, info: DistInfo,
                progress: bool = False) -> torch.Tensor | None:
    """Collective: uint8 [N, C, H, W] samples of `model` on rank 0 (None elsewhere), the noise
    of all N rows drawn from one generator seeded by `seed`."""
    n, device = shape[0], info.device
    rows = grid_rows(n, info.rank, info.world_size)
    noise = RowsOfOneStream(torch.Generator(device).manual_seed(seed), n, rows, device)
    x = diffusion.p_sample_loop(model, (len(rows), *shape[1:]), generator=noise, device=device, progress=progress)
    grid = _gather_rows(to_uint8(x).contiguous(), n, info.world_size)
    return grid.cpu() if info.is_main else None
