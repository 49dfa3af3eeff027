"""Helpers shared by the data tests: a source of unique images, shard writing, streams."""
from __future__ import annotations

import itertools

import numpy as np
import torch
from PIL import Image

from ddpm_dist.config import DataConfig
from ddpm_dist.data import build_stream
from ddpm_dist.data.batch import to_model_input
from ddpm_dist.data.convert import make_shards


class NoiseSource:
    """Unique random images: equal pixels mean the same sample, so overlaps are detectable."""

    def __init__(self, n: int, res: int):
        self.images = np.random.default_rng(0).integers(0, 256, (n, res, res, 3), dtype=np.uint8)

    def ids(self):
        return [str(i) for i in range(len(self.images))]

    def open(self, sid):
        return Image.fromarray(self.images[int(sid)])


def write_noise_shards(out, n=120, res=8, max_samples=10) -> str:
    """Shards of n unique images under a folder or s3:// URL."""
    params = {"source": "noise", "input": "", "resolution": res, "format": "png", "quality": 95,
              "seed": 0}
    make_shards(NoiseSource(n, res), str(out), params=params, max_samples=max_samples, progress=False)
    return str(out)


def stream_for(url, *, batch=4, rank=0, world=1, workers=0, flip=False, res=8, seed=1, channels=3, **data):
    """The rank's stream over `url`; extra keywords are DataConfig settings (retries=1, ...)."""
    settings = DataConfig(source=url, num_workers=workers, flip=flip, **data)
    return build_stream(settings, batch, resolution=res, channels=channels, seed=seed, rank=rank, world_size=world)


def model_inputs(stream, n: int) -> list[torch.Tensor]:
    """The stream's next n batches as the model sees them: float32 [-1, 1], flipped."""
    return [to_model_input(b, torch.device("cpu")) for b in itertools.islice(stream, n)]


def keys(x: torch.Tensor) -> list[bytes]:
    """Each image of a [-1, 1] batch as its uint8 pixel bytes."""
    return [((im + 1) * 127.5).round().to(torch.uint8).numpy().tobytes() for im in x]


def webdataset_samples(source: str) -> list[tuple[str, str, bytes]]:
    """(key, source id, RGB pixel bytes) of every sample, read by the webdataset library as
    the README shows it."""
    import webdataset as wds

    from ddpm_dist.data import webdataset_urls

    ds = wds.WebDataset(webdataset_urls(source), shardshuffle=False).decode("rgb8", only=["png"])
    return [(s["__key__"], s["id"].decode(), s["png"].tobytes()) for s in ds]


def huge_png(side: int) -> bytes:
    """A valid grey PNG of side² black pixels, a few hundred KB: what a decompression bomb looks
    like. Written chunk by chunk (PIL would take seconds to compress it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    pack, row = zlib.compressobj(1), bytes(side + 1)  # filter byte 0, then the row's pixels
    pixels = b"".join(pack.compress(row) for _ in range(side)) + pack.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
