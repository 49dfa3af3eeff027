"""FID between two image sets: `python tools/fid.py A B` prints `FID: <float>`.

A and B are image folders, ADM-style sample .npz files (arr_0, uint8 NHWC) or statistics
.npz files (mu, sigma, as written by tools/fid_stats.py).
"""
from __future__ import annotations

import argparse
import sys

from ddpm_dist.metrics.evaluate import add_inception_arguments, fid_of_paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path_a", metavar="A")
    parser.add_argument("path_b", metavar="B")
    add_inception_arguments(parser)
    args = parser.parse_args(argv)
    try:
        fid = fid_of_paths(args.path_a, args.path_b, weights=args.inception_weights,
                           device=args.device, batch_size=args.batch_size,
                           num_workers=args.num_workers)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"fid.py: error: {err}")
    print(f"FID: {fid}")


if __name__ == "__main__":
    main()
