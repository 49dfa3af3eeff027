#!/usr/bin/env python
"""Training images/s (and MFU on known GPUs) of our U-Net beside diffusers' UNet2DModel with the
same topology, measured in the same run.

    python bench/train_throughput.py [--models cifar10 celebahq] [--batch-size 128 64] [--steps 5]
                                     [--repeats 5] [--device cuda] [--bf16] [--compile]

Both networks run the training step train.py runs (`ddpm_dist.training.step`): a `single`
engine (Adam, clipping at 1.0, loss scaler, EMA; channels_last weights on CUDA), t and ε drawn
per step, L_simple forward + backward, on a fixed batch (speed does not depend on the pixels)
sent as the loader sends it: uint8 with flip flags, pinned on CUDA, copied, scaled and flipped
on the device each step.
`--bf16` is train.precision=bf16, `--compile` is train.compile=true (the whole network, for both). Each figure is the median of --repeats timed runs of
--steps steps, timed in turns with the peer after a warm-up run; the ratio column is ours /
diffusers.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import torch

from bench_utils import DiffusersAdapter, diffusers_unet, interleaved_medians
from ddpm_dist.config import load_config
from ddpm_dist.data.batch import ImageBatch
from ddpm_dist.distributed import DistInfo
from ddpm_dist.modelio.factory import build_diffusion, build_model
from ddpm_dist.training.engines import build_engine
from ddpm_dist.training.step import draw_micro_batches, step_generator, train_step
from ddpm_dist.training.telemetry import model_flops_per_image, peak_flops
from ddpm_dist.unet import count_parameters

ROOT = Path(__file__).resolve().parents[1]


def step_fn(net, cfg, batch: int, args, device):
    """A closure running --steps training steps of `net` exactly as train.py's loop does."""
    train_cfg = dataclasses.replace(cfg.train, batch_size=batch, micro_batch_size=None,
                                    precision="bf16" if args.bf16 else "fp32",
                                    compile=str(args.compile and not isinstance(net, DiffusersAdapter)).lower())
    cfg = dataclasses.replace(cfg, engine="single", train=train_cfg)
    if args.compile and isinstance(net, DiffusersAdapter):
        net.unet.compile()
    engine = build_engine(cfg, net, device, DistInfo(0, 1, 0, device, True))
    diffusion = build_diffusion(cfg.diffusion)
    shape = (batch, cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    fixed = ImageBatch(torch.randint(0, 256, shape, dtype=torch.uint8), torch.rand(batch) < 0.5)
    if device.type == "cuda":  # as the loader pins it for training on CUDA
        fixed = ImageBatch(*(t.pin_memory() for t in fixed))
    batches = itertools.repeat(fixed)
    step = itertools.count()

    def run():
        for _ in range(args.steps):
            gen = step_generator(cfg.seed, next(step), 0, device)
            micro = draw_micro_batches(batches, 1, diffusion.num_timesteps, gen, engine)
            train_step(engine, diffusion, micro, cfg.optim.lr)
    return run


def measure(name: str, batch: int, args, device) -> list[str]:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    ours = build_model(cfg.model)
    flops = model_flops_per_image(ours, cfg.model)
    nets = {"ddpm-dist": ours}
    try:
        nets["diffusers"] = DiffusersAdapter(diffusers_unet(cfg.model))
    except ImportError:
        print("diffusers is not installed: pip install 'ddpm-dist[bench]'", file=sys.stderr)
    fns = {label: step_fn(net, cfg, batch, args, device) for label, net in nets.items()}
    seconds = interleaved_medians(fns, args.repeats, device)
    rates = {label: batch * args.steps / s for label, s in seconds.items()}
    peak = peak_flops(device)
    rows = []
    for label, net in nets.items():
        mfu = f"{rates[label] * flops / peak:.1%}" if peak else "n/a"
        rows.append(f"| {name} | {label} | {count_parameters(net) / 1e6:.2f}M | {batch} | {rates[label]:,.1f} | {mfu} |")
    if len(rates) == 2:
        rows.append(f"| {name} | ratio ours/diffusers | | | {rates['ddpm-dist'] / rates['diffusers']:.2f}x | |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["cifar10", "celebahq"])
    p.add_argument("--batch-size", nargs="+", type=int, default=None, help="one per model")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    batches = args.batch_size or [128 if m == "cifar10" else 64 for m in args.models]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"bf16={args.bf16} compile={args.compile}, "
          f"median of {args.repeats} x {args.steps} steps")
    print("| model | implementation | params | batch | images/s | MFU |\n| --- | --- | --- | --- | --- | --- |")
    for name, batch in zip(args.models, batches):
        for row in measure(name, batch, args, device):
            print(row, flush=True)


if __name__ == "__main__":
    main()
