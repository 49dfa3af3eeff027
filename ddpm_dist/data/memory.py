"""A deterministic, resumable batch stream over images held in memory (the embedded digits)."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from ddpm_dist.utils.seeds import Purpose, derive_seed


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float32 [-1, 1] (the paper scales data linearly to [-1, 1])."""
    return images.float().div_(127.5).sub_(1.0)


class MemoryStream:
    """Endless batches of `batch_size` images for one rank: uint8 [N, C, H, W] images in,
    float32 [B, C, H, W] batches in [-1, 1] out, with the images' channel count C.

    Each epoch is a permutation seeded by (seed, epoch); rank r takes every world_size-th index,
    so ranks see disjoint images and the same number of batches. The position (epoch, batch)
    is checkpointed and a resumed stream continues the same sequence of samples.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, flip: bool = True):
        per_rank = len(images) // world_size
        if per_rank < batch_size:
            raise ValueError(f"{len(images)} images cannot give each of {world_size} ranks a batch of {batch_size}")
        self.images, self.batch_size, self.flip = images, batch_size, flip
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batches_per_epoch = per_rank // batch_size
        self.epoch, self.batch = 0, 0
        self.skipped = 0  # as every stream has: in-memory images are never corrupt

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, Purpose.EPOCH_ORDER))
        perm = torch.randperm(len(self.images), generator=g)
        return perm[self.rank::self.world_size][: self.batches_per_epoch * self.batch_size]

    def _flips(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, Purpose.FLIPS))
        return torch.rand(self.batches_per_epoch * self.batch_size, generator=g) < 0.5

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            order, flips = self._epoch_order(self.epoch), self._flips(self.epoch)
            while self.batch < self.batches_per_epoch:
                sl = slice(self.batch * self.batch_size, (self.batch + 1) * self.batch_size)
                x = to_model_range(self.images[order[sl]])
                if self.flip:
                    x = torch.where(flips[sl, None, None, None], x.flip(-1), x)
                self.batch += 1
                yield x
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
