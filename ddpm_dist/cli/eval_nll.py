"""Bits/dim of the variational bound (Ho et al. 2020, Eq. 5; Table 2's NLL) on a test set, on W ranks.

    python tools/eval_nll.py --ckpt MODEL --data digits|FOLDER|NPZ [--num-images N] --world-size W

Rank r takes the r-th contiguous block of the images (`distributed.rank_block`), so on shards it
reads only the one or two shards that hold its block, not all of them, and sums their bits/dim in
float64 (`evaluation.nll`); the sums are all-reduced, so the number does not depend on W; rank 0
prints the mean and writes --out JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ddpm_dist import distributed
from ddpm_dist.distributed import all_reduce_sum, rank_block
from ddpm_dist.evaluation.nll import bpd_means, bpd_sums, open_test_set
from ddpm_dist.evaluation.shared_weights import load_model_once
from ddpm_dist.launch.ranks import add_launch_arguments
from ddpm_dist.launch.tool import RankedTool, run_tool
from ddpm_dist.modelio.model_file import weights_sha256
from ddpm_dist.modelio.source import add_model_arguments, load_for_evaluation
from ddpm_dist.utils.files import atomic_write
from ddpm_dist.utils.urls import control_character_error


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p)
    add_launch_arguments(p)
    p.add_argument("--data", default="digits", help="'digits' (embedded), an image folder or an .npz (arr_0)")
    p.add_argument("--num-images", type=int, default=None, help="first N images (default: all)")
    p.add_argument("--out", help="result JSON (default: print only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if error := control_character_error(args.out, "--out"):
        p.error(error)  # a file name, and on Slurm a job script's line
    return args


def run_rank(args) -> dict | None:
    info = distributed.init_distributed(args.device)
    try:
        model, diffusion = load_model_once(args.ckpt, args.config, args.random_init, info)
        images = open_test_set(args.data, model.resolution)
        n = min(len(images), args.num_images or len(images))
        mine = list(rank_block(n, info.rank, info.world_size))
        sums = bpd_sums(model, diffusion, images, mine, seed=args.seed,
                        batch_size=args.batch_size, device=info.device, show=info.is_main)
        all_reduce_sum([sums])  # float64 sums: the mean does not depend on W
        return {**bpd_means(sums), "data": args.data, "seed": args.seed, "num_timesteps": diffusion.num_timesteps,
                "weights_sha256": weights_sha256(model.state_dict()),
                "world_size": info.world_size} if info.is_main else None
    finally:
        distributed.teardown()


def preflight(args) -> None:
    load_for_evaluation(args.ckpt, args.config, random_init=args.random_init)


def finish(args, result: dict) -> None:
    print(f"bits/dim: {result['bits_per_dim']:.6f} ({result['num_images']} images)")
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=2) + "\n")


TOOL = RankedTool(name="eval_nll.py", module="ddpm_dist.cli.eval_nll", preflight=preflight, run_rank=run_rank,
                  finish=finish, slurm_folder=lambda args: Path(args.out).parent / "slurm" if args.out else Path("slurm_logs"))


def main(argv=None) -> int:
    return run_tool(TOOL, parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
