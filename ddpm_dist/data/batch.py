"""A stream's batch as it travels from the loader to the device, and its one conversion to what
the model sees.

Loader workers send uint8 pixels, a quarter of float32's bytes over IPC and host-to-device, and
leave the flip undone; the device flips and scales them to [-1, 1] after the copy.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch


class ImageBatch(NamedTuple):
    """images: uint8 [B, C, H, W], not flipped; flips: bool [B], True where the model sees the
    image mirrored left-right (the stream's seeded draw, already and-ed with data.flip)."""
    images: torch.Tensor
    flips: torch.Tensor


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float32 [-1, 1] (the paper scales data linearly to [-1, 1])."""
    return images.float().div_(127.5).sub_(1.0)


@functools.lru_cache(maxsize=None)
def _model_range_table(device: torch.device) -> torch.Tensor:
    """to_model_range of every uint8 value, computed on the CPU and held on `device`. CUDA
    divides by a scalar as a multiply by its float32 reciprocal, which rounds 111 of the 256
    values differently (emulated on the CPU): looking them up keeps them bit-identical on every
    device."""
    return to_model_range(torch.arange(256, dtype=torch.uint8)).to(device)


def to_model_input(batch: ImageBatch, device: torch.device,
                   memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """float32 [B, C, H, W] in [-1, 1] on `device`, flipped where batch.flips says.

    The copies are non-blocking, hence asynchronous when the batch is in pinned memory.
    """
    images = batch.images.to(device, non_blocking=True)
    # Always selected, never tested with flips.any(): that read is, on a CPU device, exactly the
    # host read the sync-free step avoids (and the select costs little beside the step).
    flips = batch.flips.to(device, non_blocking=True)
    images = torch.where(flips[:, None, None, None], images.flip(-1), images)
    # index_select takes int32 indices on every device: half the temporary of int64 ones.
    x = _model_range_table(torch.device(device)).index_select(0, images.reshape(-1).int())
    return x.view(images.shape).contiguous(memory_format=memory_format)
