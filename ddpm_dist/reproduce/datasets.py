"""What each paper configuration trains on, how its raw data is obtained, and the paper's numbers
for it (Ho et al. 2020, Tables 1-2 and Appendix B)."""
from __future__ import annotations

from dataclasses import dataclass, field

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"  # 170,498,071 bytes


@dataclass(frozen=True)
class Dataset:
    source: str               # make_shards --source
    raw: str                  # what --raw names (empty: nothing to give)
    image_format: str = "png"  # lossless at 32²; the 256² sets are stored as JPEG q95
    crop: bool = False        # centre-crop + resize to the model's resolution while writing shards
    test: str | None = None   # bits/dim on: "split" (CIFAR-10's test split, written as shards),
    #                           "digits" (the embedded set); folders: --raw-test FOLDER
    paper: dict = field(default_factory=dict)  # fid, inception_score, bits_per_dim


DATASETS = {
    "cifar10": Dataset("cifar10", "cifar-10-batches-py folder or cifar-10-python.tar.gz (else downloaded)",
                       test="split", paper={"fid": 3.17, "inception_score": 9.46, "bits_per_dim": 3.75}),
    "lsun_church": Dataset("lsun", "church_outdoor_train_lmdb folder", "jpg", True, paper={"fid": 7.89}),
    "lsun_bedroom": Dataset("lsun", "bedroom_train_lmdb folder", "jpg", True, paper={"fid": 6.36}),
    "lsun_bedroom_large": Dataset("lsun", "bedroom_train_lmdb folder", "jpg", True, paper={"fid": 4.90}),
    "lsun_cat": Dataset("lsun", "cat lmdb folder", "jpg", True, paper={"fid": 19.75}),
    "celebahq": Dataset("folder", "CelebA-HQ image folder", "jpg", True),  # shown qualitatively only
    "folder": Dataset("folder", "image folder (any config; --raw-test FOLDER adds bits/dim)", crop=True),
    "demo_digits": Dataset("digits", "", test="digits"),  # embedded; no paper numbers
}


def dataset_for(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"no dataset recipe for {name!r}; pass --dataset one of {', '.join(DATASETS)}")
    return DATASETS[name]
