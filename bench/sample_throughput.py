#!/usr/bin/env python
"""Samples/s of our samplers beside diffusers' DDPMPipeline / DDIMPipeline on the same topology.

    python bench/sample_throughput.py [--models cifar10 lsun_church] [--steps 1000] [--batch-size 256]
                                      [--repeats 3] [--device cuda] [--bf16] [--compile auto]

For each model (configs/<name>.yaml, e.g. cifar10, lsun_church, or demo_digits for a quick CPU
check; random weights: speed does not depend on them) and each sampler (ancestral DDPM, DDIM η=0)
it times `Sampler` with `SampleNoise` (counter-based per-sample noise, the path of
tools/fid_sample.py, minus PNG writing), `Sampler` with one torch.Generator per sample (the
previous path) and, if `diffusers` is importable, its pipeline on a UNet2DModel of the same layout
(channels, blocks, attention resolutions; ≈ the same parameter count), same batch, same steps.
Our sampler runs as tools/fid_sample.py runs it (`samplers.network_plan`: on a GPU channels_last,
compiled with --compile auto, on a bf16 weight copy with --bf16). Each number is the median of
--repeats timed runs after one warm-up run (which compiles). "aten ops / step" is the op count
of a 3-step run minus that of a 2-step run at the same batch, eager (each op is at least one
kernel launch on a GPU, views aside). The 50k line projects the time of 50,000 samples at
1000 steps from the measured per-step rate (the goal on one H200: CIFAR-10 ≤ 35 min).
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch


from ddpm_dist.config import CHOICES, load_config
from ddpm_dist.modelio.factory import build_diffusion, build_model
from ddpm_dist.noise import SampleNoise
from ddpm_dist.samplers import Sampler, sample_generators
from ddpm_dist.unet import count_parameters
from ddpm_dist.utils.opcount import count_ops
from bench_utils import diffusers_unet, time_median

ROOT = Path(__file__).resolve().parents[1]


def ours(noise_of):
    """A builder of `Sampler` runs whose noise is `noise_of(indices, device)`."""
    def build(cfg, sampler: str, args, device):
        model = build_model(cfg.model).to(device).eval()
        shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
        diffusion = build_diffusion(cfg.diffusion)

        @functools.cache  # one Sampler, and so one compile, per number of steps
        def sampler_of(steps: int) -> Sampler:
            return Sampler(model, diffusion, shape, sampler=sampler, steps=steps, eta=0.0, bf16=args.bf16,
                           compile=args.compile)

        def run(steps: int):
            return sampler_of(steps)(noise_of(range(args.batch_size), device), device)
        return run, count_parameters(model)
    return build


def theirs(cfg, sampler: str, args, device):
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler
    unet = diffusers_unet(cfg.model).to(device).eval()
    T = cfg.diffusion.num_timesteps
    if sampler == "ddpm":
        pipe = DDPMPipeline(unet, DDPMScheduler(num_train_timesteps=T, beta_schedule="linear",
                                                variance_type="fixed_large"))
        kw = {}
    else:
        pipe, kw = DDIMPipeline(unet, DDIMScheduler(num_train_timesteps=T, beta_schedule="linear")), {"eta": 0.0}
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device).manual_seed(0)

    def run(steps: int):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            pipe(batch_size=args.batch_size, num_inference_steps=steps, generator=gen, output_type="np", **kw)
    return run, sum(p.numel() for p in unet.parameters())


def ops_per_step(run) -> int:
    """aten ops of one more reverse step: a 3-step run minus a 2-step run, eager (compiled code
    launches Inductor's kernels, which are not aten ops)."""
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        return count_ops(lambda: run(3)) - count_ops(lambda: run(2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["cifar10", "lsun_church"], help="configs/<name>.yaml")
    p.add_argument("--samplers", nargs="+", default=["ddpm", "ddim"])
    p.add_argument("--steps", type=int, default=None, help="sampling steps K (default: all T)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", choices=CHOICES["train.compile"], default="auto", help="ours: as fid_sample.py")
    args = p.parse_args()
    device = torch.device(args.device)
    impls = {"ddpm-dist SampleNoise": ours(lambda idx, dev: SampleNoise(0, idx, dev)),
             "ddpm-dist per-sample generators": ours(lambda idx, dev: sample_generators(0, idx, dev))}
    try:
        import diffusers
        impls[f"diffusers {diffusers.__version__}"] = theirs
    except ImportError:
        print("diffusers is not importable: its rows are skipped (pip install diffusers)")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), batch {args.batch_size}, steps {args.steps or 'T'}, bf16 {args.bf16}, "
          f"compile {args.compile}, median of {args.repeats}")
    print("| model | sampler | implementation | params | aten ops / step | samples/s | 50k × 1000 steps (projected) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        steps = args.steps or cfg.diffusion.num_timesteps
        for sampler in args.samplers:
            for impl, build in impls.items():
                torch.manual_seed(0)
                run, params = build(cfg, sampler, args, device)
                with torch.no_grad():
                    seconds = time_median(lambda: run(steps), args.repeats, device)
                rate = args.batch_size / seconds
                projected_h = 50_000 * 1000 / (rate * steps) / 3600
                print(f"| {name} | {sampler} | {impl} | {params / 1e6:.2f}M | {ops_per_step(run)} | {rate:.3g} "
                      f"| {projected_h:.3g} h |", flush=True)


if __name__ == "__main__":
    main()
