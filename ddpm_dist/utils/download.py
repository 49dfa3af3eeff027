"""Downloads of published files, checked against their published sha256."""
from __future__ import annotations

import hashlib
import sys
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ddpm_dist.utils.files import atomic_path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: str | Path, sha256: str, timeout_s: float = 60.0) -> Path:
    """Fetch `url` to a temporary file, check its sha256, then rename it to `dest`: no half or
    wrong file is ever left at `dest`. Network errors and a wrong hash raise OSError. A stalled
    connection ends after `timeout_s` without data."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as src:
            total = int(src.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}",
                      disable=not sys.stderr.isatty()) as bar:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise OSError(f"{url}: sha256 {digest.hexdigest()} is not the published {sha256}")
    return dest
