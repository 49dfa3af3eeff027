"""Write a training run's EMA weights as one model file for sampling: `python tools/export.py --help`.

The same as the console script `ddpm-export`; the code is ddpm_dist/cli/export.py.
"""
from ddpm_dist.cli.export import main

if __name__ == "__main__":
    raise SystemExit(main())
