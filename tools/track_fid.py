"""FID during training, into the run's TensorBoard: `python tools/track_fid.py --help`.

The same as the console script `ddpm-track-fid`; the code is ddpm_dist/cli/track_fid.py.
"""
from ddpm_dist.cli.track_fid import main

if __name__ == "__main__":
    raise SystemExit(main())
