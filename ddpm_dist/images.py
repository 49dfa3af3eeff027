"""Model outputs to pictures: [-1, 1] floats → uint8, grids, atomically written PNGs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm_dist.utils.files import atomic_path


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → uint8 [0, 255], rounding as the original code's sample export does."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def luma(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] RGB → uint8 [..., 1, H, W] grey, bit-identical to PIL's "L" conversion
    (ITU-R 601-2 luma in 16-bit fixed point, rounded)."""
    weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(3, 1, 1)
    grey = ((images.to(torch.int32) * weights).sum(-3, keepdim=True) + 0x8000) >> 16
    return grey.to(torch.uint8)


def make_grid(images: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """uint8 [N, C, H, W] → uint8 [C, rows·(H+pad)+pad, cols·(W+pad)+pad], as square as possible."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.zeros(c, rows * (h + pad) + pad, cols * (w + pad) + pad, dtype=torch.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
    return grid


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """uint8 [C, H, W] → PNG (C=1: grey "L", C=3: RGB), written atomically, so a reader never
    sees half a file."""
    path = Path(path)
    array = image.permute(1, 2, 0).cpu().numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
