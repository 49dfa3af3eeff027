"""Image sources that tools/make_shards.py converts: an image folder, the CIFAR-10 python
batches, LSUN's lmdb databases, the embedded digits.

A source lists its sample ids up front (so they can be shuffled with a seed), opens one image
by id (`open`: lazily, the header read and the pixels not yet decoded, so that data/convert.py
can refuse an image too large to decode first), and names its content with a `fingerprint` (ids and sizes): make_shards resumes only
over shards written from the same content, whatever the input folder is called. Loading
happens in worker processes; lmdb handles are opened lazily per process because an lmdb
environment must not cross a fork.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm_dist.utils.pickles import NumpyUnpickler, RefusedPickleError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


class FolderSource:
    """Every png/jpg/webp under a folder, recursively; ids are relative paths. A symlink whose
    target lies outside the folder is refused: shards hold only what the folder holds."""

    def __init__(self, root: str):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{root}: not a folder")

    def ids(self) -> list[str]:
        paths = [p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        inside = self.root.resolve()
        for p in paths:
            if not p.resolve().is_relative_to(inside):
                raise ValueError(f"{p}: a symlink to {p.resolve()}, outside {self.root}; "
                                 f"copy the file into the folder instead")
        return sorted(str(p.relative_to(self.root)) for p in paths)

    def open(self, sid: str) -> Image.Image:
        return Image.open(self.root / sid)

    def fingerprint(self) -> str:
        return fingerprint((sid, (self.root / sid).stat().st_size) for sid in self.ids())


class Cifar10Source:
    """A split of the CIFAR-10 python version: train is data_batch_1..5, test is test_batch
    (pickled dicts). They are read with an unpickler that admits numpy arrays and dtypes only, so
    a crafted batch is refused instead of running code (the official archive's sha256 is also
    checked by `ddpm_dist.reproduce.datasets`)."""

    SPLITS = {"train": "data_batch_*", "test": "test_batch"}

    def __init__(self, root: str, split: str = "train"):
        files = sorted(Path(root).glob(self.SPLITS[split]))
        if not files:
            raise FileNotFoundError(f"{root}: no {self.SPLITS[split]} files (CIFAR-10 python version)")
        batches = [self._read(f) for f in files]
        self.data = np.concatenate([b for b, _ in batches])  # [N, 3072] uint8, CHW planes
        self.names = [n for _, names in batches for n in names]

    @staticmethod
    def _read(path: Path) -> tuple[np.ndarray, list[str]]:
        try:
            with open(path, "rb") as f:
                d = NumpyUnpickler(f, path, encoding="bytes").load()
        except RefusedPickleError as e:
            raise ValueError(str(e)) from None
        except (pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({e})") from None
        data, names = (d.get(b"data"), d.get(b"filenames")) if isinstance(d, dict) else (None, None)
        if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or \
                not isinstance(names, list) or len(names) != len(data):
            raise ValueError(f"{path}: not a CIFAR-10 python batch (a dict of 'data' [N, 3072] and N 'filenames')")
        return data.astype(np.uint8, copy=False), [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def ids(self) -> list[str]:
        return [str(i) for i in range(len(self.data))]

    def open(self, sid: str) -> Image.Image:
        return Image.fromarray(self.data[int(sid)].reshape(3, 32, 32).transpose(1, 2, 0))

    def fingerprint(self) -> str:
        """The pixels themselves (150 MB hash in well under a second) and the file names."""
        return fingerprint([("pixels", hashlib.sha256(self.data.tobytes()).hexdigest()), *enumerate(self.names)])


class LsunSource:
    """An LSUN `*_lmdb` folder as distributed: keys are image ids, values encoded images."""

    def __init__(self, root: str):
        if not os.path.exists(os.path.join(root, "data.mdb")):
            raise FileNotFoundError(f"{root}: no data.mdb (expected an LSUN *_lmdb folder)")
        self.root, self._env, self._pid = root, None, None

    def _open(self):
        import lmdb

        if self._pid != os.getpid():  # never reuse a handle opened before a fork
            self._env = lmdb.open(self.root, readonly=True, lock=False, readahead=False,
                                  max_readers=126)
            self._pid = os.getpid()
        return self._env

    def __getstate__(self):
        return {"root": self.root, "_env": None, "_pid": None}

    def ids(self) -> list[str]:
        import lmdb

        # a short-lived handle: one still open in the parent would break the forked workers'
        try:
            with lmdb.open(self.root, readonly=True, lock=False) as env, env.begin() as txn:
                return [k.decode() for k in txn.cursor().iternext(keys=True, values=False)]
        except lmdb.Error as e:
            raise ValueError(f"{os.path.join(self.root, 'data.mdb')}: not an LMDB database "
                             f"({str(e).replace(self.root + ': ', '').splitlines()[0][:120]}); pass an LSUN *_lmdb folder") from None

    def fingerprint(self) -> str:
        """The keys and the database's size: each record's size would mean reading every image."""
        return fingerprint([("data.mdb", os.path.getsize(os.path.join(self.root, "data.mdb"))),
                            *((sid, "") for sid in self.ids())])

    def open(self, sid: str) -> Image.Image:
        with self._open().begin() as txn:
            data = txn.get(sid.encode())
        return Image.open(io.BytesIO(data))


class DigitsSource:
    """The embedded scikit-learn digits, upscaled to `resolution` (32 when unset)."""

    def __init__(self, resolution: int | None):
        from ddpm_dist.data.digits import load_digits_images

        self.images = load_digits_images(resolution or 32).permute(0, 2, 3, 1).numpy()

    def ids(self) -> list[str]:
        return [str(i) for i in range(len(self.images))]

    def open(self, sid: str) -> Image.Image:
        return Image.fromarray(self.images[int(sid)])

    def fingerprint(self) -> str:
        return fingerprint([("digits", self.images.shape)])  # the data ship inside scikit-learn


def fingerprint(pairs) -> str:
    """sha256 over (id, size) pairs, in order."""
    digest = hashlib.sha256()
    for sid, size in pairs:
        digest.update(f"{sid}\0{size}\n".encode())
    return digest.hexdigest()


def open_source(kind: str, path: str | None, resolution: int | None, split: str = "train"):
    """The images of `kind` at `path`. Only CIFAR-10 has a test split; the others are one set."""
    if split != "train" and kind != "cifar10":
        raise ValueError(f"--split {split}: only --source cifar10 has a test split")
    if kind == "digits":
        return DigitsSource(resolution)
    if path is None:
        raise ValueError(f"--source {kind} needs --input")
    if kind == "cifar10":
        return Cifar10Source(path, split)
    return {"folder": FolderSource, "lsun": LsunSource}[kind](path)
