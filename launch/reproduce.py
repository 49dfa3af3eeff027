"""From raw data to the paper's table in one command: `python launch/reproduce.py --help`.

The same as the console script `ddpm-reproduce`; the code is ddpm_dist/cli/reproduce.py.
"""
from ddpm_dist.cli.reproduce import main

if __name__ == "__main__":
    raise SystemExit(main())
