"""Inception statistics of images, per rank and all-reduced; FID of two paths.

`InceptionStatistics` is the one statistics path: `inception_statistics` feeds it an image
source (tools/fid.py, tools/fid_stats.py), the sampling job feeds it samples as they are made.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ddpm_dist.distributed import rank_split

from .fid import frechet_distance
from .image_sources import image_batches, open_images
from .inception import FEATURE_DIM, NUM_LOGITS, WEIGHTS_FILE, load_inception
from .inception_score import InceptionScoreStats, split_of
from .stats import FeatureStats, load_stats, save_stats


class InceptionStatistics:
    """FID statistics (float64 sums of pool features) and, with `splits`, Inception Score
    statistics of images as they come; `all_reduce` sums them over the ranks."""

    def __init__(self, model, num_images: int, device, splits: int | None = None):
        self.model, self.num_images, self.device, self.splits = model, num_images, device, splits
        self.fid = FeatureStats(FEATURE_DIM, device=device)
        self.inception_score = InceptionScoreStats(NUM_LOGITS, splits, device=device) if splits else None

    @torch.no_grad()
    def update(self, images: torch.Tensor, indices: torch.Tensor) -> None:
        """images: float [B, 3, H, W] in [0, 1]; indices: their positions in the whole set
        (they pick the Inception Score split)."""
        features, logits = self.model(images.to(self.device))
        self.fid.update(features)
        if self.inception_score is not None:
            self.inception_score.update(logits, split_of(indices, self.num_images, self.splits))

    def all_reduce(self) -> None:
        """Sum over the process group; a caller alone in a group must not count twice."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.fid.all_reduce()
            if self.inception_score is not None:
                self.inception_score.all_reduce()

    def result(self, out_dir: str | Path, ref_stats: tuple[np.ndarray, np.ndarray] | None) -> dict:
        """IS, FID against `ref_stats`, and mu/sigma saved as `out_dir/inception_stats.npz`
        (pytorch-fid's format: tools/fid.py scores it against other references later)."""
        mu, sigma = self.fid.mean_cov()
        path = Path(out_dir) / "inception_stats.npz"
        save_stats(path, mu, sigma)
        out = {"inception_score": None, "inception_score_std": None, "fid": None, "stats": str(path)}
        if self.inception_score is not None:
            out["inception_score"], out["inception_score_std"] = self.inception_score.score()
        if ref_stats is not None:
            out["fid"] = frechet_distance(mu, sigma, *ref_stats)
        return out


def inception_statistics(model, images, *, batch_size=50, num_workers=0, device="cpu",
                         rank=0, world_size=1, splits=None, progress=True):
    """FeatureStats (and InceptionScoreStats when `splits` is given) of all images.

    Rank r takes indices r, r+W, ...; inside a process group the sums are all-reduced,
    so every rank returns the statistics of the whole source.
    """
    stats = InceptionStatistics(model, len(images), device, splits)
    indices = rank_split(range(len(images)), rank, world_size)
    bar = tqdm(total=len(indices), unit="img", disable=not progress or rank != 0)
    for idx, batch in image_batches(images, indices, batch_size, num_workers):
        stats.update(batch, idx)
        bar.update(len(idx))
    bar.close()
    if world_size > 1:
        stats.all_reduce()
    return stats.fid, stats.inception_score


def path_statistics(path, get_model, **kwargs):
    """(mu, sigma) of a statistics .npz as stored, else of the images at `path`."""
    stats = load_stats(path)
    if stats is not None:
        return stats
    images = open_images(path)
    fid_stats, _ = inception_statistics(get_model(), images, **kwargs)
    return fid_stats.mean_cov()


def fid_of_paths(path_a, path_b, *, weights=None, device="cpu", **kwargs) -> float:
    """FID between two folders / sample .npz / statistics .npz; loads Inception only if needed."""
    model = None

    def get_model():
        nonlocal model
        if model is None:
            model = load_inception(weights, device)
        return model

    mu1, sigma1 = path_statistics(path_a, get_model, device=device, **kwargs)
    mu2, sigma2 = path_statistics(path_b, get_model, device=device, **kwargs)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_inception_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every evaluation tool shares."""
    parser.add_argument("--inception-weights", metavar="FILE", default=None,
                        help=f"pytorch-fid state dict ({WEIGHTS_FILE}); default: "
                             "torch.hub cache, downloaded once where online")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding workers")
    parser.add_argument("--device", default=default_device())
