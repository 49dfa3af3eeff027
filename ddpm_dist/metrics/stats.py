"""Streaming float64 feature statistics: mean and covariance without keeping the features.

Each rank keeps a running sum, sum of outer products and count; `all_reduce` adds them
across ranks, so no feature is ever gathered (as in NVlabs/edm's fid.py). Float64 because
the covariance is a difference of large sums, which float32 cancels badly at 50k images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddpm_dist.distributed import all_reduce_sum
from ddpm_dist.utils.files import atomic_path



class FeatureStats:
    """Running Σx, Σxxᵀ and n of D-dimensional features, kept in float64."""

    def __init__(self, dim: int, device="cpu"):
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        assert features.ndim == 2 and features.shape[1] == self.sum.shape[0], features.shape
        x = features.to(device=self.sum.device, dtype=torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_outer += x.T @ x

    def all_reduce(self) -> None:
        all_reduce_sum([self.count, self.sum, self.sum_outer])

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """mu and the unbiased (ddof=1) covariance, as numpy float64 for scipy."""
        n = int(self.count.item())
        if n < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {n}")
        mu = self.sum / n
        sigma = (self.sum_outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def save_stats(path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Reference statistics in pytorch-fid's .npz format (keys mu, sigma)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez would add ".npz"
        np.savez(f, mu=mu, sigma=sigma)


def load_stats(path) -> tuple[np.ndarray, np.ndarray] | None:
    """(mu, sigma) of a statistics .npz; None for anything else (an image source)."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return None
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            return None
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not match")
    return mu, sigma
