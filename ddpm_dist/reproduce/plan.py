"""One reproduction's settings and the files each of its stages leaves behind.

    RUN = the config's out_dir
    RUN/checkpoints/step_<total>          train: the last step's checkpoint
    RUN/model_ema.safetensors             export: the EMA weights
    SHARDS (data.source), SHARDS-test     prepare: the training set and a held-out split
    RUN/eval/reference_train.npz          prepare: Inception statistics of the training shards
    RUN/eval/fid<N>/result.json           fid: FID / IS of N samples per seed set
    RUN/eval/nll.json                     nll: bits/dim on the test split
    RUN/report.md, RUN/report.json        report
    RUN/slurm/                            every stage's Slurm logs; the settings the prepare and
                                          report jobs read (resolved at submission)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ddpm_dist.config import Config
from ddpm_dist.reproduce.datasets import Dataset


@dataclass(frozen=True)
class Resources:
    """Where the stages run: training on nodes × GPUs, evaluation on W ranks."""
    nodes: int = 1
    gpus_per_node: int = 8          # 0: CPU-only cluster
    tasks_per_node: int | None = None  # default: one per GPU (1 without GPUs)
    cpus_per_task: int = 8
    partition: str | None = None
    account: str | None = None
    train_time_min: int = 24 * 60   # per run; training requeues itself at the limit
    signal_delay_s: int = 300
    max_requeues: int = 100
    eval_world_size: int = 8
    eval_time_min: int = 12 * 60


@dataclass(frozen=True)
class Plan:
    config: str                 # the YAML file
    overrides: tuple[str, ...]  # key=value settings for training
    cfg: Config                 # config + overrides
    name: str                   # dataset recipe name
    dataset: Dataset
    raw: str | None             # the raw data (--raw); CIFAR-10 is downloaded without it
    raw_test: str | None        # a held-out image folder for bits/dim (--raw-test)
    raw_dir: Path               # where downloads and extractions go
    inception_weights: Path     # pytorch-fid's file (given, cached, or downloaded by prepare)
    num_samples: int = 50_000
    seeds: int = 3
    sample_steps: int | None = None  # respaced sampling steps (default: all T)
    sampler: str = "ddpm"
    nll_images: int | None = None    # first N test images (default: all)
    resources: Resources = Resources()

    @property
    def run(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def shards(self) -> str:
        return self.cfg.data.source

    @property
    def test_data(self) -> str | None:
        """The bits/dim test set: the held-out split's shards, beside the training shards."""
        if self.dataset.test == "split" or self.raw_test:
            return self.shards.rstrip("/") + "-test"
        return self.dataset.test

    @property
    def reference_stats(self) -> Path:
        return self.run / "eval" / "reference_train.npz"

    @property
    def model_file(self) -> Path:
        return self.run / "model_ema.safetensors"

    @property
    def fid_dir(self) -> Path:
        return self.run / "eval" / f"fid{self.num_samples}"

    @property
    def nll_file(self) -> Path:
        return self.run / "eval" / "nll.json"

    @property
    def report_file(self) -> Path:
        return self.run / "report.json"

    @property
    def slurm_folder(self) -> Path:
        return self.run / "slurm"

    def job_name(self, stage: str) -> str:
        """Unique per run folder, so a rerun finds its stages still in the queue."""
        tag = hashlib.sha1(str(self.run.resolve()).encode()).hexdigest()[:6]
        return f"ddpm-{stage}-{self.run.name}-{tag}"
