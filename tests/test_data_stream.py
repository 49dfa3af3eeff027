"""The shard training stream on local disk: ranks, equal batch counts, resume, damage."""
from __future__ import annotations

import itertools
import json
import logging
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_dist.data.fs import DataConfigError, DataError
from ddpm_dist.data.convert import tar_bytes
from ddpm_dist.data.shards import sha256
from data_helpers import NoiseSource, keys, model_inputs, stream_for, write_noise_shards


def test_batches_are_model_range_and_ranks_disjoint_with_equal_counts(tmp_path):
    url = write_noise_shards(tmp_path / "s")
    seen = []
    for rank in range(2):
        s = stream_for(url, rank=rank, world=2)
        assert s.batches_per_epoch == 120 // 2 // 4
        raw = list(itertools.islice(s, s.batches_per_epoch))
        assert all(b.images.shape == (4, 3, 8, 8) and b.images.dtype == torch.uint8
                   and b.flips.shape == (4,) and b.flips.dtype == torch.bool for b in raw)
        epoch = model_inputs(raw, len(raw))
        assert all(x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 for x in epoch)
        assert min(x.min() for x in epoch) >= -1 and max(x.max() for x in epoch) <= 1
        seen.append({k for x in epoch for k in keys(x)})
    assert len(seen[0]) == len(seen[1]) == 60 and not seen[0] & seen[1]


def test_uneven_shards_give_every_rank_the_same_batch_count(tmp_path):
    url = write_noise_shards(tmp_path / "s", n=47, max_samples=10)  # 10,10,10,10,7
    counts = []
    for rank in range(3):
        s = stream_for(url, rank=rank, world=3, batch=3)
        it = iter(s)
        n = 0
        while s.epoch == 0:
            next(it)
            n += 1
        counts.append(n - 1)  # the last next() already began epoch 1
    assert counts == [47 // 3 // 3] * 3


def test_flip_mirrors_some_images(tmp_path):
    url = write_noise_shards(tmp_path / "s")
    plain = next(iter(stream_for(url, batch=32)))
    flipped = next(iter(stream_for(url, batch=32, flip=True)))
    assert torch.equal(plain.images, flipped.images)  # the loader sends the pixels unflipped
    assert not plain.flips.any() and flipped.flips.any() and not flipped.flips.all()
    plain, flipped = model_inputs([plain, flipped], 2)
    same = (plain == flipped).flatten(1).all(1)
    mirrored = (plain.flip(-1) == flipped).flatten(1).all(1)
    assert (same | mirrored).all() and mirrored.any() and same.any()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_same_sample_sequence(tmp_path, workers):
    url = write_noise_shards(tmp_path / "s", n=100, max_samples=7)
    reference = stream_for(url, workers=workers, flip=True)
    batches = model_inputs(reference, 20)  # 12 batches per epoch: crosses an epoch
    first = stream_for(url, workers=workers, flip=True)
    list(itertools.islice(first, 9))
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = stream_for(url, workers=workers, flip=True)
    resumed.load_state_dict(state)
    for want, got in zip(batches[9:], model_inputs(resumed, 11)):
        assert torch.equal(want, got)
    assert resumed.state_dict() == reference.state_dict()


def test_corrupt_sample_and_truncated_shard_are_skipped_and_counted(tmp_path, caplog):
    url = write_noise_shards(tmp_path / "s", n=40, max_samples=10)
    index_path = tmp_path / "s" / "index.json"
    index = json.loads(index_path.read_text())
    bad = tar_bytes([("000000000.png", b"not a png")] + [(f"00000000{i}.png", _png()) for i in (1, 2)])
    (tmp_path / "s" / "shard-000000.tar").write_bytes(bad)
    index["shards"][0].update(samples=3, sha256=sha256(bad), bytes=len(bad))
    index_path.write_text(json.dumps(index))
    shard1 = tmp_path / "s" / "shard-000001.tar"
    shard1.write_bytes(shard1.read_bytes()[:5000])  # truncated mid-member
    s = stream_for(url, batch=2)
    with caplog.at_level(logging.WARNING):
        batches = list(itertools.islice(s, 3 * s.batches_per_epoch))
    assert len(batches) == 3 * s.batches_per_epoch and s.skipped >= 1 + 7
    assert "corrupt sample" in caplog.text and "checksum differs" in caplog.text


def _png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_missing_index_incomplete_and_empty_are_one_line_errors(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(DataConfigError, match="not found"):
        stream_for(str(tmp_path / "nowhere"))
    url = write_noise_shards(tmp_path / "s", n=20)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    for change, message in [({"complete": False}, "incomplete"), ({"shards": []}, "no shards")]:
        (tmp_path / "s" / "index.json").write_text(json.dumps({**index, **change}))
        with pytest.raises(DataError, match=message) as info:
            stream_for(url)
        assert "\n" not in str(info.value)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("channels", [1, 3])
def test_an_epoch_holds_every_image_with_memory_stream_values(tmp_path, channels):
    from ddpm_dist.data.convert import make_shards
    from ddpm_dist.data.digits import load_digits_images
    from ddpm_dist.data.batch import to_model_range
    from ddpm_dist.data.sources import DigitsSource

    params = {"source": "digits", "input": "", "resolution": 8, "format": "png", "quality": 95,
              "seed": 0}
    make_shards(DigitsSource(8), str(tmp_path), params=params, max_samples=400, progress=False)
    s = stream_for(str(tmp_path), batch=3, channels=channels)  # 1797 = 599 * 3: each image once
    epoch = torch.cat(model_inputs(s, s.batches_per_epoch))
    want = to_model_range(load_digits_images(8, channels))
    assert epoch.shape == (1797, channels, 8, 8)
    assert sorted(keys(epoch)) == sorted(keys(want)) and torch.equal(
        epoch.sort(0).values, want.sort(0).values)  # bit-identical to MemoryStream's values


def test_a_one_channel_stream_decodes_shards_to_pil_grey(tmp_path):
    """RGB shards, 1-channel model: batches are [B, 1, R, R] of PIL's "L" of each image."""
    from ddpm_dist.data.batch import to_model_range
    from ddpm_dist.images import luma

    url = write_noise_shards(tmp_path / "s", n=40)
    s = stream_for(url, batch=4, channels=1)
    epoch = torch.cat(model_inputs(s, s.batches_per_epoch))
    assert epoch.shape == (40, 1, 8, 8)
    rgb = NoiseSource(40, 8).images
    pil_grey = torch.from_numpy(np.stack([np.array(Image.fromarray(im).convert("L")) for im in rgb]))[:, None]
    assert sorted(keys(epoch)) == sorted(keys(to_model_range(pil_grey)))
    assert torch.equal(luma(torch.from_numpy(rgb).permute(0, 3, 1, 2)), pil_grey)  # eval_nll's grey


def test_channels_other_than_1_or_3_are_refused(tmp_path):
    url = write_noise_shards(tmp_path / "s", n=8)
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3 \\(RGB\\) channels, not 2"):
        stream_for(url, channels=2)
