"""Batches travel as uint8 pixels and flip flags; the model sees exactly the values it saw when the
loader sent float32 [-1, 1] images already flipped: checked against PIL decoding and numpy."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_dist.config import DataConfig
from ddpm_dist.data import build_stream
from ddpm_dist.data.batch import ImageBatch, to_model_input
from ddpm_dist.data.memory import MemoryStream
from ddpm_dist.utils.seeds import Purpose, derive_seed, numpy_rng
from data_helpers import model_inputs, stream_for, write_noise_shards

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))


def _model_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 → float32 x / 127.5 - 1, each step rounded to float32 (IEEE, as numpy does)."""
    return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_every_pixel_value_converts_exactly_and_flags_flip(device):
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(2, 3, 1, 1)
    batch = ImageBatch(values, torch.tensor([False, True]))
    if device == "cuda":  # as the loader sends them to a CUDA device
        batch = ImageBatch(*(t.pin_memory() for t in batch))
    x = to_model_input(batch, torch.device(device), torch.channels_last).cpu()
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x[0, 0].flatten(), torch.from_numpy(_model_range(np.arange(256))))
    assert torch.equal(x[1], x[0].flip(-1)) and torch.equal(x[0, 0], x[0, 2])


def _pngs(path) -> list[bytes]:
    with tarfile.open(path) as tar:
        return [tar.extractfile(m).read() for m in tar if m.name.endswith(".png")]


def _as_seen(png: bytes, flip: bool) -> np.ndarray:
    """What the model sees of a sample: PIL-decoded, mirrored if flipped, in [-1, 1], [C, H, W]."""
    with Image.open(io.BytesIO(png)) as img:
        img = img.convert("RGB")
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _model_range(np.asarray(img)).transpose(2, 0, 1)


def _expected_epoch(folder, seed: int, rank: int, world: int, workers: int, batch: int):
    """Epoch 0 of a rank, from the stream's seeded draws: shards perm(seed, 0)[s::streams] for
    stream s = rank + world * worker, samples in shard position p ordered and flipped by the
    generator (seed, 0, s, p, 1); the loader takes the workers' batches in turn."""
    names = [s["name"] for s in json.loads((folder / "index.json").read_text())["shards"]]
    nw = max(workers, 1)
    perm = numpy_rng(seed, 0).permutation(len(names))
    per_worker = []
    for worker in range(nw):
        stream, seen = rank + world * worker, []
        for p, shard in enumerate(perm[stream::world * nw]):
            pngs = _pngs(folder / names[shard])
            rng = numpy_rng(seed, 0, stream, p, 1)
            order, flips = rng.permutation(len(pngs)), rng.random(len(pngs)) < 0.5
            seen += [_as_seen(pngs[i], f) for i, f in zip(order, flips)]
        per_worker.append([np.stack(seen[i:i + batch]) for i in range(0, len(seen), batch)])
    return [b for turn in zip(*per_worker) for b in turn]


@pytest.mark.parametrize("rank, world, workers", [(0, 1, 0), (1, 2, 0), (0, 1, 2)])
def test_shard_stream_model_inputs_equal_pil_decoding_flipped_by_the_seeded_draw(
        tmp_path, rank, world, workers):
    url = write_noise_shards(tmp_path, n=40, max_samples=10)  # 4 shards: every stream's own fill it
    s = stream_for(url, rank=rank, world=world, workers=workers, flip=True, seed=5)
    got = model_inputs(s, s.batches_per_epoch)
    want = _expected_epoch(tmp_path, 5, rank, world, workers, 4)
    assert len(got) == len(want) == 40 // world // 4
    assert all(torch.equal(g, torch.from_numpy(w)) for g, w in zip(got, want))


def test_memory_stream_model_inputs_equal_the_seeded_order_and_flips():
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    s = MemoryStream(images, 4, rank=1, world_size=2, seed=3)
    got = torch.cat(model_inputs(s, s.batches_per_epoch))
    order = torch.randperm(40, generator=torch.Generator().manual_seed(
        derive_seed(3, 0, Purpose.EPOCH_ORDER)))[1::2]
    flips = torch.rand(20, generator=torch.Generator().manual_seed(
        derive_seed(3, 0, 1, Purpose.FLIPS))).numpy() < 0.5
    x = _model_range(images[order].numpy())
    assert torch.equal(got, torch.from_numpy(np.where(flips[:, None, None, None], x[..., ::-1], x)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("source", ["shards", "digits"])
def test_a_stream_for_cuda_sends_pinned_batches(tmp_path, source):
    data = DataConfig(source=write_noise_shards(tmp_path) if source == "shards" else "digits", num_workers=1)
    batch = next(iter(build_stream(data, 4, resolution=8, pin_memory=True)))
    assert batch.images.is_pinned() and batch.flips.is_pinned()
