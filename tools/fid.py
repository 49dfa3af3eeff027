"""FID between two image sets: `python tools/fid.py --help`.

The same as the console script `ddpm-fid`; the code is ddpm_dist/cli/fid.py.
"""
from ddpm_dist.cli.fid import main

if __name__ == "__main__":
    raise SystemExit(main())
