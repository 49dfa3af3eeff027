"""Write a config with its overrides applied, as one resolved YAML file:

    python -m ddpm_dist.launch.config_snapshot --config configs/lsun_church.yaml --out FILE key=value ...

launch/_train_job.sh writes one per Slurm job when the job first starts, or launch/sbatch.py one
when the job is submitted, and every run of the job (requeues included) trains from it, so an
edit of the YAML file does not reach a job that has one. The file's folder is made only once the
settings are valid: a refused setting leaves nothing behind.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddpm_dist.config import ConfigError, load_config, save_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="the resolved YAML file (written atomically)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_config(cfg, args.out)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
