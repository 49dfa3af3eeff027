"""The picture of a sampling run: its first samples as one grid PNG (`samples_grid.png` beside
`result.json` for tools/fid_sample.py; the reproduction report shows the same)."""
from __future__ import annotations

from pathlib import Path

import torch

from ddpm_dist.evaluation.generate import load_png, sample_path
from ddpm_dist.images import make_grid, save_png

GRID_FILE = "samples_grid.png"
GRID_SAMPLES = 64


def write_samples_grid(sample_dir: str | Path, out: str | Path, n: int = GRID_SAMPLES) -> int:
    """Samples 0, 1, ... (up to n, stopping at the first missing PNG) as one grid at `out`.
    Returns how many it shows; 0 writes nothing (the PNGs were removed after scoring)."""
    images = []
    for i in range(n):
        path = sample_path(sample_dir, i)
        if not path.is_file():
            break
        images.append(load_png(path))
    if images:
        save_png(make_grid(torch.stack(images)), out)
    return len(images)
