"""Training data: every source gives an endless, resumable stream of [-1, 1] image batches.

A stream is an iterable of float32 [B, C, H, W] tensors, C = cfg.model.in_channels (1: grey,
3: RGB), with `state_dict()` / `load_state_dict()` for its position, so a resumed run continues
the same sample sequence.
"""
from __future__ import annotations

from ddpm_dist.config import Config


def build_stream(cfg: Config, batch_size: int, *, rank: int = 0, world_size: int = 1):
    """The training stream of one rank: `batch_size` images per batch at the model's resolution
    and channel count."""
    if cfg.data.source == "digits":
        from ddpm_dist.data.digits import load_digits_images
        from ddpm_dist.data.memory import MemoryStream

        images = load_digits_images(cfg.model.resolution, cfg.model.in_channels)
        return MemoryStream(images, batch_size, rank=rank, world_size=world_size, seed=cfg.seed,
                            flip=cfg.data.flip)
    from ddpm_dist.data.stream import open_shard_stream

    return open_shard_stream(cfg.data.source, batch_size=batch_size, resolution=cfg.model.resolution,
                             channels=cfg.model.in_channels, rank=rank, world_size=world_size,
                             seed=cfg.seed, data_cfg=cfg.data)
