"""A deterministic, resumable batch stream over images held in memory (the embedded digits)."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from ddpm_dist.data.batch import ImageBatch
from ddpm_dist.distributed import rank_split
from ddpm_dist.utils.seeds import Purpose, derive_seed


class MemoryStream:
    """Endless batches of `batch_size` images for one rank: uint8 [N, C, H, W] images in,
    ImageBatch out (uint8 [B, C, H, W] and the flips), as ShardStream gives them.

    Each epoch is a permutation seeded by (seed, epoch); rank r takes every world_size-th index,
    so ranks see disjoint images and the same number of batches. The position (epoch, batch)
    is checkpointed and a resumed stream continues the same sequence of samples. pin_memory
    (training on CUDA): each batch is gathered into page-locked memory, so its copy to the
    device does not wait for the host (pinned blocks are cached and reused once their copy ends).
    """

    def __init__(self, images: torch.Tensor, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, flip: bool = True, pin_memory: bool = False):
        per_rank = len(images) // world_size
        if per_rank < batch_size:
            raise ValueError(f"{len(images)} images cannot give each of {world_size} ranks a batch of {batch_size}")
        self.images, self.batch_size, self.flip, self.pin_memory = images, batch_size, flip, pin_memory
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batches_per_epoch = per_rank // batch_size
        self.epoch, self.batch = 0, 0
        self.skipped = 0  # as every stream has: in-memory images are never corrupt

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, Purpose.EPOCH_ORDER))
        perm = torch.randperm(len(self.images), generator=g)
        return rank_split(perm, self.rank, self.world_size)[: self.batches_per_epoch * self.batch_size]

    def _flips(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, Purpose.FLIPS))
        return torch.rand(self.batches_per_epoch * self.batch_size, generator=g) < 0.5

    def __iter__(self) -> Iterator[ImageBatch]:
        while True:
            order, flips = self._epoch_order(self.epoch), self._flips(self.epoch) & self.flip
            while self.batch < self.batches_per_epoch:
                sl = slice(self.batch * self.batch_size, (self.batch + 1) * self.batch_size)
                self.batch += 1
                batch = ImageBatch(self.images[order[sl]], flips[sl])
                yield ImageBatch(*(t.pin_memory() for t in batch)) if self.pin_memory else batch
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
