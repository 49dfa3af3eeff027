"""The embedded default data set: scikit-learn's 1,797 handwritten digits (real 8x8 scans that
ship inside the scikit-learn package), upscaled to a power-of-two size as uint8 images."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def load_digits_images(resolution: int = 32, channels: int = 3) -> torch.Tensor:
    """All digits as uint8 [1797, channels, resolution, resolution], white ink on black.

    The scans are grey: channels=1 gives them as they are, channels=3 repeats them as grey RGB.
    """
    if channels not in (1, 3):
        raise ValueError(f"digits come as 1 (grey) or 3 (grey RGB) channels, not {channels}")
    from sklearn.datasets import load_digits  # optional at import time of the package

    images = torch.from_numpy(load_digits().images).float() / 16.0  # [N, 8, 8] in [0, 1]
    images = F.interpolate(images[:, None], size=(resolution, resolution), mode="bilinear",
                           align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return images.expand(-1, channels, -1, -1).contiguous()
