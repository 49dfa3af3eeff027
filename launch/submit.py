"""Submit DDPM training through submitit: `python launch/submit.py --help`.

The same as the console script `ddpm-submit`; the code is ddpm_dist/cli/submit.py.
"""
from ddpm_dist.cli.submit import main

if __name__ == "__main__":
    raise SystemExit(main())
