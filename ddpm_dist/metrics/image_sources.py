"""Image sources for evaluation: indexable collections of uint8 HWC RGB images.

A source has `len()` and `source[i]` → np.uint8 [H, W, 3]; ranks take strided index
slices of it. A new kind of source is one class or function plus one line in `open_images`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm_dist.data.shards import max_side
from ddpm_dist.utils.urls import location_error

# The largest image side an evaluation decodes: the loader's bound for the largest resolution
# anyone evaluates here (1024), far above every config's.
EVAL_MAX_SIDE = max_side(1024)

# pytorch-fid's extensions.
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}


class FolderImages:
    """Every image file below a folder (subfolders included), in sorted path order."""

    def __init__(self, root):
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i) -> np.ndarray:
        with Image.open(self.files[i]) as image:  # the header only
            if max(image.size) > EVAL_MAX_SIDE:  # a small file can claim a huge image
                raise ValueError(f"{self.files[i]}: a {image.size[0]}x{image.size[1]} image; evaluation decodes "
                                 f"images of at most {EVAL_MAX_SIDE} pixels a side")
            return np.array(image.convert("RGB"))  # a writable copy, as torch wants


class ArrayImages:
    """uint8 NHWC array, e.g. `arr_0` of an ADM-style samples .npz; grey images → RGB."""

    def __init__(self, array: np.ndarray, name="array"):
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
            raise ValueError(f"{name}: expected uint8 [N, H, W, 3], got {array.dtype} {array.shape}")
        self.array = array

    def __len__(self):
        return len(self.array)

    def __getitem__(self, i) -> np.ndarray:
        image = self.array[i]
        return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


class ShardImages:
    """Every image of a shard set (a folder or s3:// URL holding index.json, as make_shards
    writes it) in index order, decoded as training decodes them, unflipped: the training set's
    reference statistics come from exactly the images the model saw. A shard whose bytes differ
    from index.json stops the statistics with one line rather than leaving images out."""

    def __init__(self, url: str, endpoint: str | None = None):
        from ddpm_dist.data.shards import read_index
        self.url, self.endpoint = url.rstrip("/"), endpoint
        index = read_index(url, endpoint=endpoint)
        self.resolution = int(index["resolution"])
        self.shards = [(s["name"], int(s["samples"]), s["sha256"]) for s in index["shards"]]
        self.starts = np.cumsum([0] + [count for _, count, _ in self.shards])
        self._cached: tuple[int, list[bytes]] = (-1, [])  # the last shard read: indices come in order

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, i) -> np.ndarray:
        from ddpm_dist.data.shards import decode
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        return decode(self._images(shard)[i - self.starts[shard]], self.resolution)

    def _images(self, shard: int) -> list[bytes]:
        from ddpm_dist.data import fs
        from ddpm_dist.data.shards import read_shard_at
        if self._cached[0] != shard:
            name, count, checksum = self.shards[shard]
            read = read_shard_at(fs.join(self.url, name), count, checksum, endpoint=self.endpoint)
            if read.problem or read.missing:
                raise ValueError(f"{read.url} differs from index.json (damaged or rewritten); "
                                 f"write the shards again with make_shards")
            self._cached = (shard, read.images)
        return self._cached[1]


def load_npz_images(path) -> ArrayImages:
    with np.load(path) as data:
        if "arr_0" not in data:
            raise ValueError(f"{path}: expected key arr_0 (images) or mu and sigma (statistics), "
                             f"found {sorted(data.keys())}")
        return ArrayImages(data["arr_0"], name=f"{path}:arr_0")


def open_images(path):
    """The image source behind a path: shards (s3:// or a folder with index.json), an image
    folder, or an .npz holding arr_0. Another URL scheme is refused: it would be read as a folder."""
    message = location_error(str(path), "the image source")
    if message:
        raise ValueError(message)
    if str(path).startswith("s3://") or (Path(path) / "index.json").is_file():
        return ShardImages(str(path))
    path = Path(path)
    if path.is_dir():
        return FolderImages(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.suffix == ".npz":
        return load_npz_images(path)
    raise ValueError(f"{path}: expected an image folder or an .npz file")


class _Indexed(torch.utils.data.Dataset):
    """(global index, CHW uint8 tensor) for the given indices of a source."""

    def __init__(self, images, indices):
        self.images, self.indices = images, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = self.indices[k]
        try:
            image = self.images[i]
        except ValueError as e:  # raised again by `_stack`, in the main process: one line, not a worker's trace
            return i, str(e)
        return i, torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def _collate(items):
    indices, images = zip(*items)
    return torch.tensor(indices), list(images)


def _stack(images):
    """Stack in the main process, so mixed sizes give a one-line error, not a worker trace."""
    refused = next((image for image in images if isinstance(image, str)), None)
    if refused:
        raise ValueError(refused)
    if len({image.shape for image in images}) > 1:
        raise ValueError(f"images differ in size ({sorted({tuple(i.shape) for i in images})}); "
                         "FID needs one size: resize them first")
    return torch.stack(images)


def uint8_batches(images, indices, batch_size: int, num_workers: int = 0):
    """Yield (global indices [B], images [B, 3, H, W] uint8), decoding in workers."""
    loader = torch.utils.data.DataLoader(_Indexed(images, indices), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate)
    for idx, batch in loader:
        yield idx, _stack(batch)


def image_batches(images, indices, batch_size: int, num_workers: int = 0):
    """Yield (global indices [B], images [B, 3, H, W] float in [0, 1]), decoding in workers."""
    for idx, batch in uint8_batches(images, indices, batch_size, num_workers):
        yield idx, batch.float() / 255  # pytorch-fid's ToTensor: x / 255
