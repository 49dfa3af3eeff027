"""Training data: every source gives an endless, resumable stream of image batches.

A stream is an iterable of `batch.ImageBatch` (uint8 [B, C, H, W] pixels and per-image flip
flags), C = cfg.model.in_channels (1: grey, 3: RGB), with `state_dict()` / `load_state_dict()`
for its position, so a resumed run continues the same sample sequence.
`batch.to_model_input` turns a batch into the model's float32 [-1, 1] input on the device.
"""
from __future__ import annotations

from ddpm_dist.config import DataConfig


def build_stream(data: DataConfig, batch_size: int, *, resolution: int, channels: int = 3, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False):
    """The training stream of one rank from the config's `data` section: `batch_size` images per
    batch at the model's `resolution` and `channels`, in the order `seed` gives. pin_memory (for
    a CUDA device): batches arrive in page-locked memory, so the copy to the device is
    asynchronous (shard batches and the in-memory digits' alike)."""
    if data.source == "digits":
        from ddpm_dist.data.digits import load_digits_images
        from ddpm_dist.data.memory import MemoryStream

        images = load_digits_images(resolution, channels)
        return MemoryStream(images, batch_size, rank=rank, world_size=world_size, seed=seed, flip=data.flip,
                            pin_memory=pin_memory)
    from ddpm_dist.data.stream import open_shard_stream

    return open_shard_stream(data.source, batch_size=batch_size, resolution=resolution, channels=channels,
                             rank=rank, world_size=world_size, seed=seed, data_cfg=data, pin_memory=pin_memory)


def webdataset_urls(source: str, *, endpoint: str | None = None) -> list[str]:
    """The URLs of the shards that `source`/index.json lists, for `webdataset.WebDataset(urls)`.

    `source` is a folder or s3:// prefix written by tools/make_shards.py; for s3:// this also
    registers our s3:// opener with webdataset (fs.register_webdataset_s3).
    """
    from ddpm_dist.data import fs
    from ddpm_dist.data.shards import read_index

    index = read_index(source, endpoint=endpoint)
    if source.startswith("s3://"):
        fs.register_webdataset_s3(endpoint)
    return [fs.join(source, shard["name"]) for shard in index["shards"]]
