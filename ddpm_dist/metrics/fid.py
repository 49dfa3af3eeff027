"""Fréchet Inception Distance (Heusel et al. 2017) between two Gaussians (mu, sigma).

d² = |mu1 − mu2|² + tr(S1) + tr(S2) − 2 tr((S1 S2)^½), with scipy's sqrtm as in the TF
reference and pytorch-fid, including their fixes for near-singular products.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs "
                         f"{mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm_product(sigma1, sigma2, eps)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm_product(sigma1, sigma2, eps):
    """(S1 S2)^½, real. A singular product (fewer images than dimensions) can give a
    non-finite root: retry with eps on both diagonals, as the references do."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular product; adding {eps} to the covariance diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Rounding leaves tiny imaginary parts; a large one means the inputs are broken.
        largest = np.max(np.abs(np.diagonal(covmean).imag))
        if largest > 1e-3:
            raise ValueError(f"FID: matrix square root has imaginary part {largest:.3g}")
        covmean = covmean.real
    return covmean
