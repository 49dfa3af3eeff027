"""Reference Inception statistics (mu, sigma) of an image folder or sample .npz: `python tools/fid_stats.py --help`.

The same as the console script `ddpm-fid-stats`; the code is ddpm_dist/cli/fid_stats.py.
"""
from ddpm_dist.cli.fid_stats import main

if __name__ == "__main__":
    raise SystemExit(main())
