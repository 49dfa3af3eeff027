"""WebDataset tar shards and reading them back safely (data/convert.py writes them).

A shard is a plain tar of `{key}.{png|jpg|webp}` (+ `{key}.id`, the source's id) members, the
WebDataset convention, so any WebDataset reader can consume it. The id is text (a path for
folder sources), while webdataset's default decoders read a `.id` member as an integer: with
webdataset, decode only the image (`.decode("rgb8", only=["png"])`). `index.json` beside the
shards lists every shard's name, sample count, size and sha256, the resolution and the
parameters that made them; readers trust it for counts, and make_shards trusts it to skip
verified shards.

Everything that reads shards comes here: `read_index` (index.json, checked), `read_shard_at`
(a shard's image bytes, checked against index.json's sha256; damaged tars salvaged by
`read_images`), `read_samples_at` (a range of a shard's samples through its sample index, each
checked against its own sha256) and `decode` (bytes → uint8 pixels as the model sees them). The training stream
(data/stream.py) and the reference statistics (metrics/image_sources.py) both use them.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import re
import struct
import tarfile
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ddpm_dist.data import fs
from ddpm_dist.data.fs import DataConfigError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def centre_crop_resize(img: Image.Image, resolution: int) -> Image.Image:
    """The DDPM LSUN preprocessing: centre crop to a square, then an antialiased resize."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.BICUBIC, reducing_gap=None)
    return img


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safe_member_name(name: str) -> bool:
    """Reject members that would escape their folder (absolute paths, '..', backslash tricks)."""
    norm = posixpath.normpath(name.replace("\\", "/"))
    return not (norm.startswith("/") or norm == ".." or norm.startswith("../") or ":" in norm)


def read_images(data: bytes, shard: str) -> tuple[list[tuple[str, bytes]], int]:
    """(key, image bytes) in tar order, and how many members were rejected.

    A truncated or damaged tar yields the samples before the damage; unsafe or non-file
    members are skipped. Neither is fatal: the caller counts and reports them.
    """
    images, rejected = [], 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                if ext.lower() not in IMAGE_EXTS:
                    continue
                if not member.isfile() or not safe_member_name(member.name):
                    log.warning("%s: skipping unsafe member %r", shard, member.name)
                    rejected += 1
                    continue
                end = member.offset_data + member.size
                if end > len(data):  # tarfile only notices a cut member when reading it
                    raise EOFError("member cut short")
                images.append((key, data[member.offset_data:end]))  # no file object per member
    except (tarfile.TarError, EOFError, OSError) as exc:
        log.warning("%s: damaged tar after %d samples (%s)", shard, len(images), type(exc).__name__)
    return images, rejected


PIL_MODES = {1: "L", 3: "RGB"}  # model channels → the PIL mode images are decoded to


def max_side(resolution: int) -> int:
    """The largest image side decoded for a `resolution` model: 8× it, at least 1024. A small
    file can claim a huge image (a one-colour 9500² PNG is 285 KB and decodes to 270 MB)."""
    return max(8 * resolution, 1024)


class OversizedImage(ValueError):
    """An image whose header claims a side over `max_side`: refused before it is decoded."""


def check_side(img: Image.Image, resolution: int) -> None:
    """Raise OversizedImage for an opened, not yet decoded image over `max_side(resolution)`."""
    if max(img.size) > max_side(resolution):
        raise OversizedImage(f"a {img.size[0]}x{img.size[1]} image, over the {max_side(resolution)}-pixel side "
                             f"decoded for resolution {resolution}")


def decode(data: bytes, resolution: int, channels: int = 3) -> np.ndarray:
    """Image bytes → uint8 [R, R, channels]; other sizes are centre-cropped and resized.
    channels=1 converts to grey with PIL's "L" (ITU-R 601-2 luma). An image whose header
    claims a side over `max_side` raises OversizedImage before any pixel is decoded."""
    mode = PIL_MODES[channels]
    with Image.open(io.BytesIO(data)) as img:  # reads the header only
        check_side(img, resolution)
        if img.mode != mode:
            img = img.convert(mode)
        if img.size != (resolution, resolution):
            img = centre_crop_resize(img, resolution)
        return np.array(img).reshape(resolution, resolution, channels)


@dataclass
class ShardRead:
    """One read of a shard: its image bytes, and how many index.json samples are not among them."""
    url: str
    images: list[bytes]
    missing: int
    problem: str = ""  # why the whole shard is unused, e.g. a checksum mismatch


def read_shard_at(url: str, count: int, checksum: str, *, endpoint: str | None = None, retries: int = 5,
                  wait: float = 1.0, cancel: threading.Event | None = None) -> ShardRead:
    """A shard's image bytes; one whose bytes differ from index.json (truncated, rewritten,
    damaged) is not used at all: its index.json samples are all missing."""
    data = fs.read_bytes(url, endpoint=endpoint, retries=retries, wait=wait, cancel=cancel)
    if sha256(data) != checksum:
        return ShardRead(url, [], count, f"checksum differs from index.json ({len(data)} bytes read)")
    images, rejected = read_images(data, url)
    return ShardRead(url, [b for _, b in images], max(count - len(images), rejected))


# ---- sample indexes: reading a range of a shard's samples -----------------------------------------
# Beside each shard make_shards writes `{shard}.idx`: a 16-byte header (SAMPLE_INDEX_MAGIC, then
# the sample count as uint64) and one fixed-size record per sample in tar order: the byte offset
# of its first member's header, its size (all its members with their padding) and the sha256 of
# those bytes. Fixed-size records let a reader fetch the records of samples [lo, hi) alone, and
# then only those samples' bytes: the whole-shard sha256 cannot be checked on such a partial
# read, each sample's own is.

SAMPLE_INDEX_MAGIC = b"DDPMSIDX"
SAMPLE_RECORD = struct.Struct("<QQ32s")  # offset, size, sha256 digest
SAMPLE_INDEX_HEADER = 16


@dataclass(frozen=True)
class SampleRecord:
    offset: int
    size: int
    digest: bytes


def sample_index_bytes(records: list[tuple[int, int, bytes]]) -> bytes:
    """The `.idx` file of a shard whose samples are (offset, size, sha256 digest) in tar order."""
    return SAMPLE_INDEX_MAGIC + struct.pack("<Q", len(records)) + \
        b"".join(SAMPLE_RECORD.pack(*r) for r in records)


def sample_record_range(lo: int, hi: int) -> tuple[int, int]:
    """The byte range [start, end) of the records of samples [lo, hi) in a `.idx` file."""
    return SAMPLE_INDEX_HEADER + lo * SAMPLE_RECORD.size, SAMPLE_INDEX_HEADER + hi * SAMPLE_RECORD.size


def read_sample_records(data: bytes) -> list[SampleRecord]:
    """The records in `data`: the bytes of a `sample_record_range`, or a whole `.idx` file's
    bytes after its SAMPLE_INDEX_HEADER."""
    return [SampleRecord(*SAMPLE_RECORD.unpack_from(data, k))
            for k in range(0, len(data) - SAMPLE_RECORD.size + 1, SAMPLE_RECORD.size)]


def read_samples_at(url: str, index_url: str, lo: int, hi: int, shard_bytes: int, *,
                    endpoint: str | None = None, retries: int = 5, wait: float = 1.0,
                    cancel: threading.Event | None = None) -> ShardRead:
    """Samples [lo, hi) of a shard, read by two ranges: their records from the shard's `.idx`
    file, then their bytes. A sample whose bytes differ from its record's sha256 is missing
    (counted); records that point outside the shard make all of them missing."""
    where, count = f"{url}[{lo}:{hi}]", hi - lo
    options = dict(endpoint=endpoint, retries=retries, wait=wait, cancel=cancel)
    start, end = sample_record_range(lo, hi)
    records = read_sample_records(fs.read_bytes(index_url, start=start, end=end, **options))
    if len(records) != count or not _records_fit(records, shard_bytes):
        return ShardRead(where, [], count, f"its sample index {index_url} is damaged; rewrite it with make_shards")
    first = records[0].offset
    data = fs.read_bytes(url, start=first, end=records[-1].offset + records[-1].size, **options)
    images, bad = [], 0
    for r in records:
        sample = data[r.offset - first:r.offset - first + r.size]
        found = read_images(sample, url)[0] if hashlib.sha256(sample).digest() == r.digest else []
        bad += len(found) != 1
        images += [b for _, b in found[:1]]
    problem = f"{bad} sample{'s' if bad > 1 else ''} whose checksum differs from {index_url}" if bad else ""
    return ShardRead(where, images, count - len(images), problem)


def _records_fit(records: list[SampleRecord], shard_bytes: int) -> bool:
    """Records in tar order, each inside the shard: a damaged index cannot ask for other bytes."""
    return all(a.offset + a.size <= b.offset for a, b in zip(records, records[1:])) and \
        records[-1].offset + records[-1].size <= shard_bytes and records[0].offset >= 0


def load_index(data: bytes, url: str) -> dict:
    """index.json checked before anything is read: complete, with shards named inside `url`."""
    try:
        index = json.loads(data)
    except ValueError:
        raise DataConfigError(f"{url}: index.json is not valid JSON") from None
    problem = _index_problem(index)
    if problem:
        from ddpm_dist.data import fs
        raise DataConfigError(f"{fs.join(url, 'index.json')}: {problem}; rewrite it with tools/make_shards.py")
    if not index.get("complete", False):
        raise DataConfigError(f"{url}: index.json is incomplete (make_shards did not finish)")
    if not index.get("shards"):
        raise DataConfigError(f"{url}: index.json lists no shards")
    for shard in index["shards"]:
        for name in (shard.get("name"), shard.get("sample_index", "x")):
            _check_name(name, url)
    return index


def _check_name(name, url: str) -> None:
    """A file named in index.json must lie inside the data folder."""
    if not isinstance(name, str) or not name or not safe_member_name(name):
        raise DataConfigError(f"{url}: index.json names shard {name!r} outside the data folder "
                              f"(absolute, '..' or a URL); refusing to read it")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _index_problem(index) -> str | None:
    """What makes `index` unusable by the readers (a key missing or of the wrong type), or None."""
    if not isinstance(index, dict):
        return f"expected a mapping, got {type(index).__name__}"
    if "resolution" not in index:
        return "no 'resolution'"
    if not (_whole(index["resolution"]) and index["resolution"] > 0):
        return f"'resolution' must be a positive whole number, got {index['resolution']!r}"
    shards = index.get("shards")
    if shards is None:
        return None  # "lists no shards" below
    if not isinstance(shards, list):
        return "'shards' must be a list of shards"
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            return f"shard {i}: expected a mapping, got {shard!r}"
        where = f"shard {i} ({shard.get('name')})"
        for key in ("samples", "sha256"):
            if key not in shard:
                return f"{where}: no {key!r}"
        if not (_whole(shard["samples"]) and shard["samples"] >= 0):
            return f"{where}: 'samples' must be a whole number 0 or more, got {shard['samples']!r}"
        if not (isinstance(shard["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", shard["sha256"])):
            return f"{where}: 'sha256' must be 64 hex digits, got {shard['sha256']!r}"
        if "sample_index" in shard and not (_whole(shard.get("bytes")) and isinstance(shard["sample_index"], str)):
            return f"{where}: a 'sample_index' needs a file name and the shard's 'bytes'"
    return None


def read_index(url: str, *, endpoint: str | None = None, retries: int = 5) -> dict:
    """The index.json of the shards at `url`, read (an error no retry can fix ends at once: a
    missing file, a wrong bucket, denied access) and checked by `load_index`."""
    return load_index(fs.read_bytes(fs.join(url, "index.json"), endpoint=endpoint, retries=retries, check=True), url)
