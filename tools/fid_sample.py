"""Sample N images from a model on W ranks and score FID / IS: `python tools/fid_sample.py --help`.

The same as the console script `ddpm-fid-sample`; the code is ddpm_dist/cli/fid_sample.py.
"""
from ddpm_dist.cli.fid_sample import main

if __name__ == "__main__":
    raise SystemExit(main())
