"""Files that are either complete or absent.

Every file the project writes for later use (configs, checkpoints' JSON, model files, sample
PNGs, result JSON, downloads) goes through `atomic_path`: write under a temp name beside the
target, fsync it, rename it over the target, fsync the folder. A reader, or a run killed at any
moment, sees the old file or the new one, never half of one. Temp names are
`.<name>.tmp<pid>-<16 random hex digits>`, so a cleaner can find what a killed writer left
(`is_temp_file`) and no one can guess one in advance; the temp file is created exclusively
(O_EXCL, O_NOFOLLOW: a file or symlink planted at that name is never written through) with
mode 0666 less the user's umask.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

_TEMP_NAME = re.compile(r"^\..+\.tmp\d+(-[0-9a-f]{16})?$")  # without the suffix: older versions' names


def temp_path(path: str | Path) -> Path:
    """A new, empty temp file beside `path`, created exclusively under an unpredictable name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(8)}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
    return tmp


def is_temp_file(path: str | Path) -> bool:
    """True for a temp file of `atomic_path` (possibly left by a killed writer)."""
    return bool(_TEMP_NAME.match(Path(path).name))


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (the folder entry, not only the file data)."""
    fsync_file(path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` for a writer that wants a file name (PIL, safetensors,
    torch.save, numpy). When the block ends the file is fsynced and renamed over `path`; when it
    raises, the temp file is removed and `path` is untouched. Missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
