"""Inception statistics of an image source, per rank and all-reduced; FID of two paths."""
from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from .fid import frechet_distance
from .image_sources import image_batches, open_images
from .inception import FEATURE_DIM, NUM_LOGITS, WEIGHTS_FILE, load_inception
from .inception_score import InceptionScoreStats, split_of
from .stats import FeatureStats, load_stats


@torch.no_grad()
def inception_statistics(model, images, *, batch_size=50, num_workers=0, device="cpu",
                         rank=0, world_size=1, splits=None, progress=True):
    """FeatureStats (and InceptionScoreStats when `splits` is given) of all images.

    Rank r takes indices r, r+W, ...; inside a process group the sums are all-reduced,
    so every rank returns the statistics of the whole source.
    """
    fid_stats = FeatureStats(FEATURE_DIM, device=device)
    is_stats = InceptionScoreStats(NUM_LOGITS, splits, device=device) if splits else None
    indices = range(rank, len(images), world_size)
    bar = tqdm(total=len(indices), unit="img", disable=not progress or rank != 0)
    for idx, batch in image_batches(images, indices, batch_size, num_workers):
        features, logits = model(batch.to(device))
        fid_stats.update(features)
        if is_stats is not None:
            is_stats.update(logits, split_of(idx, len(images), splits))
        bar.update(len(idx))
    bar.close()
    if world_size > 1:  # a caller alone in a process group must not count its sums twice
        fid_stats.all_reduce()
        if is_stats is not None:
            is_stats.all_reduce()
    return fid_stats, is_stats


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
