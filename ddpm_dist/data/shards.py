"""WebDataset tar shards: encoding images, packing and writing shards, reading them back safely.

A shard is a plain tar of `{key}.{png|jpg|webp}` (+ `{key}.id`, the source's id) members, the
WebDataset convention, so any WebDataset reader can consume it. The id is text (a path for
folder sources), while webdataset's default decoders read a `.id` member as an integer: with
webdataset, decode only the image (`.decode("rgb8", only=["png"])`). `index.json` beside the
shards lists every shard's name, sample count, size and sha256, the resolution and the
parameters that made them; readers trust it for counts, and make_shards trusts it to skip
verified shards.
Tars are written deterministically (fixed mtime/owner), so the same input gives the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import re
import tarfile
from collections.abc import Iterable, Iterator

from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def centre_crop_resize(img: Image.Image, resolution: int) -> Image.Image:
    """The DDPM LSUN preprocessing: centre crop to a square, then an antialiased resize."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.BICUBIC, reducing_gap=None)
    return img


def encode(img: Image.Image, *, resolution: int | None, fmt: str, quality: int) -> bytes:
    img = img.convert("RGB")
    if resolution:
        img = centre_crop_resize(img, resolution)
    buf = io.BytesIO()
    options = {"quality": quality} if fmt in ("jpg", "webp") else {}
    img.save(buf, format=PIL_FORMATS[fmt], **options)
    return buf.getvalue()


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A tar with fixed metadata: identical members give identical bytes (stable checksums)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def pack(samples: Iterable[tuple[str, str, bytes]], *, max_samples: int,
         max_bytes: int) -> Iterator[list[tuple[str, str, bytes]]]:
    """Group (key, id, image bytes) into shards of at most max_samples / about max_bytes."""
    group, size = [], 0
    for sample in samples:
        if group and (len(group) >= max_samples or size + len(sample[2]) > max_bytes):
            yield group
            group, size = [], 0
        group.append(sample)
        size += len(sample[2]) + 1536  # two tar headers and padding
    if group:
        yield group


def shard_members(group: list[tuple[str, str, bytes]], fmt: str) -> Iterator[tuple[str, bytes]]:
    for key, sid, data in group:
        yield f"{key}.{fmt}", data
        yield f"{key}.id", sid.encode()


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


def load_index(data: bytes, url: str) -> dict:
    """index.json checked before anything is read: complete, with shards named inside `url`."""
    from ddpm_dist.data.fs import DataConfigError

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
        name = shard.get("name")
        if not isinstance(name, str) or not name or not safe_member_name(name):
            raise DataConfigError(f"{url}: index.json names shard {name!r} outside the data folder "
                                  f"(absolute, '..' or a URL); refusing to read it")
    return index


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
    return None


def read_index(url: str, *, endpoint: str | None = None, retries: int = 5) -> dict:
    """The index.json of the shards at `url`, read (an error no retry can fix ends at once: a
    missing file, a wrong bucket, denied access) and checked by `load_index`."""
    from ddpm_dist.data import fs
    return load_index(fs.read_bytes(fs.join(url, "index.json"), endpoint=endpoint, retries=retries, check=True), url)
