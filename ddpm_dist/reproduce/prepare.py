"""The chain's first stage: raw data → shards (+ the test split) → reference statistics, with
pytorch-fid's Inception weights in place. Each step skips what is already there.

Runs where the network is: on the login node (`--prepare-here`) when compute nodes have none.
"""
from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path

from ddpm_dist.data import fs
from ddpm_dist.data.shards import read_index
from ddpm_dist.reproduce.datasets import CIFAR10_SHA256, CIFAR10_URL
from ddpm_dist.reproduce.plan import Plan
from ddpm_dist.utils.download import download, file_sha256

log = logging.getLogger(__name__)


def shards_complete(url: str, endpoint: str | None = None) -> bool:
    """index.json exists and make_shards finished it."""
    try:
        read_index(url, endpoint=endpoint, retries=1)
        return True
    except fs.DataError:
        return False


def is_prepared(plan: Plan) -> bool:
    return (shards_complete(plan.shards, plan.cfg.data.s3_endpoint)
            and (not _held_out(plan) or shards_complete(plan.test_data, plan.cfg.data.s3_endpoint))
            and plan.reference_stats.is_file() and plan.inception_weights.is_file())


def _held_out(plan: Plan) -> bool:
    return plan.test_data is not None and plan.test_data != "digits"


def prepare(plan: Plan) -> None:
    from ddpm_dist.metrics.inception import resolve_weights
    resolve_weights(plan.inception_weights if plan.inception_weights.is_file() else None)  # else downloads
    raw = raw_input(plan)
    _write_shards(plan, raw, plan.shards, "train")
    if plan.raw_test:
        _write_shards(plan, plan.raw_test, plan.test_data, "train")  # a folder: its only split
    elif plan.dataset.test == "split":
        _write_shards(plan, raw, plan.test_data, "test")
    if not plan.reference_stats.is_file():
        _reference_statistics(plan)


def raw_input(plan: Plan) -> str | None:
    """The folder make_shards reads: --raw as given, or for CIFAR-10 the python-version batches
    (extracted from --raw's tarball, or from the official one downloaded and sha256-checked)."""
    if plan.dataset.source == "digits":
        return None
    if plan.dataset.source != "cifar10":
        if not plan.raw:
            raise ValueError(f"{plan.name}: pass --raw, the {plan.dataset.raw}")
        return plan.raw
    if plan.raw and Path(plan.raw).is_dir():
        return plan.raw
    extracted = plan.raw_dir / "cifar-10-batches-py"
    if (extracted / "test_batch").is_file():
        return str(extracted)
    tarball = Path(plan.raw) if plan.raw else plan.raw_dir / "cifar-10-python.tar.gz"
    if not tarball.is_file():
        log.info("downloading %s", CIFAR10_URL)
        try:
            download(CIFAR10_URL, tarball, CIFAR10_SHA256)
        except OSError as err:
            raise ValueError(f"CIFAR-10 download failed ({err}); fetch {CIFAR10_URL} on a machine with "
                             f"network and pass --raw cifar-10-python.tar.gz, or use --prepare-here") from None
    _check_sha256(tarball, CIFAR10_SHA256)
    with tarfile.open(tarball) as tar:
        tar.extractall(plan.raw_dir, filter="data")  # refuses members that leave raw_dir
    return str(extracted)


def _check_sha256(path: Path, expected: str) -> None:
    found = file_sha256(path)
    if found != expected:
        raise ValueError(f"{path}: sha256 {found} is not the official archive's {expected}; "
                         f"download it again from {CIFAR10_URL}")


def _write_shards(plan: Plan, raw: str | None, out: str, split: str) -> None:
    if shards_complete(out, plan.cfg.data.s3_endpoint):
        return
    from ddpm_dist.data.convert import convert_source
    # The 256² sets are centre-cropped and resized while writing; the digits upscaled from 8².
    resize = plan.dataset.crop or plan.dataset.source == "digits"
    log.info("writing the %s shards of %s to %s", split, raw or plan.dataset.source, out)
    index = convert_source(plan.dataset.source, raw, out, resolution=plan.cfg.model.resolution if resize else None,
                           image_format=plan.dataset.image_format, split=split,
                           workers=min(os.cpu_count() or 1, 16), endpoint=plan.cfg.data.s3_endpoint)
    log.info("wrote %d samples in %d shards to %s", index["total"], len(index["shards"]), out)


def _reference_statistics(plan: Plan) -> None:
    """pytorch-fid's convention: every training image, unflipped, as the model saw it."""
    from ddpm_dist.metrics.evaluate import default_device, path_statistics
    from ddpm_dist.metrics.inception import load_inception
    from ddpm_dist.metrics.stats import save_stats
    device = default_device()
    log.info("reference statistics of %s → %s", plan.shards, plan.reference_stats)
    mu, sigma = path_statistics(plan.shards, lambda: load_inception(plan.inception_weights, device), device=device)
    plan.reference_stats.parent.mkdir(parents=True, exist_ok=True)
    save_stats(plan.reference_stats, mu, sigma)
