#!/usr/bin/env python
"""Training images/s (and MFU on known GPUs) of our U-Net beside diffusers' UNet2DModel with the
same topology, measured in the same run.

    python bench/train_throughput.py [--models cifar10 celebahq] [--batch-size 128 64] [--steps 5]
                                     [--repeats 5] [--device cuda] [--bf16] [--compile] [--channels-last]

One training step = L_simple forward + backward + Adam (fused on CUDA, foreach elsewhere) + EMA
lerp, on random data (speed does not depend on the pixels). Both networks get the same batch,
precision, memory format and optimizer. Each figure is the median of --repeats timed runs of
--steps steps, timed in turns with the peer after a warm-up run; the ratio column is ours /
diffusers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_utils import diffusers_unet, interleaved_medians  # noqa: E402
from ddpm_dist.config import load_config  # noqa: E402
from ddpm_dist.modelio.factory import build_diffusion, build_model  # noqa: E402
from ddpm_dist.training.telemetry import model_flops_per_image, peak_flops  # noqa: E402
from ddpm_dist.unet import count_parameters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def step_fn(net, call, cfg, batch: int, args, device):
    """A closure running --steps training steps of `net` called as call(net, x, t)."""
    diffusion = build_diffusion(cfg.diffusion)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(device, memory_format=fmt).train()
    if args.compile:
        net = torch.compile(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    ema = [p.detach().clone() for p in net.parameters()]
    shape = (batch, cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
    x0 = torch.randn(shape, device=device).clamp(-1, 1).to(memory_format=fmt)
    model = lambda x, t: call(net, x, t)  # noqa: E731

    def run():
        for _ in range(args.steps):
            t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = diffusion.training_losses(model, x0, t).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - 0.9999)
    return run


def measure(name: str, batch: int, args, device) -> list[str]:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    ours = build_model(cfg.model)
    flops = model_flops_per_image(ours, cfg.model)
    nets = {"ddpm-dist": (ours, lambda n, x, t: n(x, t))}
    try:
        nets["diffusers"] = (diffusers_unet(cfg.model), lambda n, x, t: n(x, t).sample)
    except ImportError:
        print("diffusers is not installed: pip install 'ddpm-dist[bench]'", file=sys.stderr)
    fns = {label: step_fn(net, call, cfg, batch, args, device) for label, (net, call) in nets.items()}
    seconds = interleaved_medians(fns, args.repeats, device)
    rates = {label: batch * args.steps / s for label, s in seconds.items()}
    peak = peak_flops(device)
    rows = []
    for label, (net, _) in nets.items():
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
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    batches = args.batch_size or [128 if m == "cifar10" else 64 for m in args.models]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"bf16={args.bf16} compile={args.compile} channels_last={args.channels_last}, "
          f"median of {args.repeats} x {args.steps} steps")
    print("| model | implementation | params | batch | images/s | MFU |\n| --- | --- | --- | --- | --- | --- |")
    for name, batch in zip(args.models, batches):
        for row in measure(name, batch, args, device):
            print(row, flush=True)


if __name__ == "__main__":
    main()
