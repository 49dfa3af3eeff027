"""How the network runs on a device: dtype names, autocast, memory layout and torch.compile
policy. One place for what training (`ddpm_dist.training.engines`) and sampling
(`ddpm_dist.samplers`) both decide, so neither depends on the other."""
from __future__ import annotations

import contextlib
import warnings
from typing import ContextManager

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, precision: str) -> ContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout of the weights, and so of the inputs: channels_last on CUDA (faster
    convolutions on tensor cores); on a CPU the default layout, whose results channels_last
    would change in the last bits."""
    return torch.channels_last if device.type == "cuda" else torch.preserve_format


def enable_cudnn_benchmark(device: torch.device) -> None:
    """On CUDA, cuDNN times its convolution algorithms once per input shape and keeps the fastest
    (cudnn.benchmark): a run's shapes are fixed (the training batch; sampling pads its last
    batch), so the one-off timing pays back at every later step."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def compile_enabled(setting: str, device: torch.device) -> bool:
    """train.compile and the sampler's --compile: "auto" compiles on CUDA only."""
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def guard_cpu_compile(device: torch.device, precision: str) -> None:
    """Inductor's AVX-512/AMX CPU code gave NaN or ~1e38 bf16/fp16 gradients for this U-Net on
    CPUs with those units (torch 2.x), while AVX2 code and eager mode were correct.
    Force 256-bit (AVX2) vector code for low precision on CPU rather than train on garbage."""
    if device.type != "cpu" or precision == "fp32":
        return
    import torch._inductor.config as inductor_config
    inductor_config.cpp.simdlen = 256  # AVX2 if the CPU has it, else scalar code; both are safe
    warnings.warn(f"torch.compile with {precision} on CPU: using AVX2 vector code instead of "
                  "AVX-512/AMX, which produced NaN gradients here", stacklevel=3)
