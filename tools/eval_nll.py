"""Bits/dim of the variational bound on a test set, on W ranks: `python tools/eval_nll.py --help`.

The same as the console script `ddpm-eval-nll`; the code is ddpm_dist/cli/eval_nll.py.
"""
from ddpm_dist.cli.eval_nll import main

if __name__ == "__main__":
    raise SystemExit(main())
