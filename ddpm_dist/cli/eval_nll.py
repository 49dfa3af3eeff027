"""Bits/dim of the variational bound (Ho et al. 2020, Eq. 5; Table 2's NLL) on a test set, on W ranks.

    python tools/eval_nll.py --ckpt MODEL --data digits|FOLDER|NPZ [--num-images N] --world-size W

Rank r takes images r, r+W, ...; image i's forward-process noise comes from the noise stream keyed
by (seed, i) (`noise.SampleNoise`), so the number does not depend on W. Per-image bits/dim are summed in float64 and
all-reduced; rank 0 prints the mean and writes --out JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ddpm_dist import distributed
from ddpm_dist.distributed import all_reduce_sum
from ddpm_dist.images import luma
from ddpm_dist.launch.ranks import add_launch_arguments
from ddpm_dist.launch.tool import RankedTool, run_tool
from ddpm_dist.modelio.model_file import weights_sha256
from ddpm_dist.modelio.source import add_model_arguments, load_for_evaluation
from ddpm_dist.noise import SampleNoise
from ddpm_dist.utils.files import atomic_write


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
    return p.parse_args(argv)


def open_test_set(data: str, resolution: int):
    """uint8 HWC images, indexable: the embedded digits, a folder or an ADM-style npz."""
    if data == "digits":
        from ddpm_dist.data.digits import load_digits_images
        from ddpm_dist.metrics.image_sources import ArrayImages
        return ArrayImages(load_digits_images(resolution).permute(0, 2, 3, 1).numpy(), name="digits")
    from ddpm_dist.metrics.image_sources import open_images
    return open_images(data)


def to_model_input(images: torch.Tensor, channels: int, resolution: int) -> torch.Tensor:
    """[0, 1] float [B, 3, H, W] → [-1, 1] at the model's shape (as training sees data: a
    1-channel model gets the grey that the shard stream decodes, PIL's "L")."""
    if images.shape[-1] != resolution or images.shape[-2] != resolution:
        raise ValueError(f"test images are {tuple(images.shape[-2:])}, the model wants {resolution}²")
    if channels not in (1, 3):
        raise ValueError(f"the model has {channels} input channels; test images are grey (1) or RGB (3)")
    if channels == 1:
        images = luma((images * 255).round().to(torch.uint8)).float() / 255
    return images * 2 - 1


def bpd_sums(model, diffusion, images, indices, args, device, show: bool) -> torch.Tensor:
    """float64 [count, Σ total, Σ prior, Σ L_0] of this rank's images."""
    from ddpm_dist.metrics.image_sources import image_batches
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    bar = tqdm(total=len(indices), unit="img", desc="bits/dim (rank 0)", disable=not show)
    for idx, batch in image_batches(images, indices, args.batch_size):
        x = to_model_input(batch, model.in_channels, model.resolution)
        noise = SampleNoise(args.seed, idx.tolist(), device)
        out = diffusion.calc_bpd_loop(model, x.to(device), generator=noise)
        sums += torch.stack([out["total_bpd"].new_tensor(float(len(idx))), out["total_bpd"].sum(),
                             out["prior_bpd"].sum(), out["vb"][:, 0].sum()])
        bar.update(len(idx))
    bar.close()
    return sums


def run_rank(args) -> dict | None:
    model, diffusion = load_for_evaluation(args.ckpt, args.config, random_init=args.random_init)
    info = distributed.init_distributed(args.device)
    try:
        images = open_test_set(args.data, model.resolution)
        n = min(len(images), args.num_images or len(images))
        sums = bpd_sums(model.to(info.device), diffusion, images,
                        list(range(info.rank, n, info.world_size)), args, info.device, info.is_main)
        all_reduce_sum([sums])  # float64 sums: the mean does not depend on W
        count, total, prior, decoder = sums.cpu().tolist()
        return {"bits_per_dim": total / count, "prior_bpd": prior / count, "decoder_bpd": decoder / count,
                "num_images": int(count), "data": args.data, "seed": args.seed, "num_timesteps":
                diffusion.num_timesteps, "weights_sha256": weights_sha256(model.state_dict()),
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
