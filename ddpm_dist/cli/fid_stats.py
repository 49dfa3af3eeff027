"""Reference statistics: `python tools/fid_stats.py SRC --out stats.npz` writes mu, sigma.

SRC is an image folder, shards written by tools/make_shards.py (a folder or s3:// URL with
index.json: the training set as the model saw it), or an ADM-style sample .npz (arr_0). The
output is pytorch-fid's format, usable as A or B of tools/fid.py.
"""
from __future__ import annotations

import argparse
import sys

from ddpm_dist.data.fs import DataError
from ddpm_dist.metrics.evaluate import add_inception_arguments, inception_statistics
from ddpm_dist.metrics.image_sources import open_images
from ddpm_dist.metrics.inception import PIPELINE, load_inception
from ddpm_dist.metrics.stats import save_stats
from ddpm_dist.utils.urls import control_character_error


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", metavar="SRC")
    parser.add_argument("--out", required=True, help="output .npz (keys mu, sigma)")
    add_inception_arguments(parser)
    args = parser.parse_args(argv)
    try:
        if error := control_character_error(args.out, "--out"):  # a file name: no newline, no escape
            raise ValueError(error)
        images = open_images(args.src)
        model = load_inception(args.inception_weights, args.device)
        stats, _ = inception_statistics(model, images, batch_size=args.batch_size,
                                        num_workers=args.num_workers, device=args.device)
        mu, sigma = stats.mean_cov()
    except (FileNotFoundError, ValueError, DataError) as err:
        sys.exit(f"fid_stats.py: error: {err}")
    save_stats(args.out, mu, sigma)
    print(f"wrote {args.out}: {len(images)} images; pipeline: {PIPELINE}")


if __name__ == "__main__":
    main()
