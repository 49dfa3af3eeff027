"""What the benchmarks share: the diffusers peer of a config and median timing."""
from __future__ import annotations

import statistics
import time

import torch

from ddpm_dist.config import ModelConfig
from ddpm_dist.modelio.diffusers_format import unet_config


class DiffusersAdapter(torch.nn.Module):
    """diffusers' UNet2DModel called like ours: model(x, t) → ε."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def diffusers_unet(cfg: ModelConfig):
    """diffusers' UNet2DModel with our layout, built from the config our exporter writes (the
    google/ddpm-* checkpoints use the same layout)."""
    from diffusers import UNet2DModel

    settings = {k: v for k, v in unet_config(cfg).items() if not k.startswith("_")}
    return UNet2DModel.from_config(settings)


def time_median(fn, repeats: int, device: torch.device, warmup: bool = True) -> float:
    """Median seconds of `repeats` runs after a warm-up (kernel selection, allocator, compile)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds of each function, timed in turns (a, b, a, b, ...) after one warm-up each,
    so a change in machine load during the run hits every peer alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_median(fn, 1, device, warmup=False))
    return {name: statistics.median(values) for name, values in times.items()}
