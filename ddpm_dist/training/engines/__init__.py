"""Training engines behind one interface (see `base.Engine`): single, ddp, fsdp, deepspeed."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ddpm_dist.config import Config, ConfigError
from ddpm_dist.distributed import DistInfo
from ddpm_dist.engine_registry import ENGINES
from ddpm_dist.runtime import compile_enabled, enable_cudnn_benchmark, memory_format

from .base import DynamicLossScaler, Engine, StepResult, apply_block_options, checkpoint_format
from .settings import EngineSettings, fsdp_mesh_shape

__all__ = ["Engine", "StepResult", "DynamicLossScaler", "build_engine", "engine_class", "batch_split",
           "fsdp_mesh_shape", "checkpoint_format", "EngineSettings"]


def batch_split(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, micro-batches per step) so the global batch holds on any world size;
    a ConfigError (one line, exit status 2) saying what to set when the world size does not fit."""
    total, micro = cfg.train.batch_size, cfg.train.micro_batch_size
    if total % world_size:
        raise ConfigError(_unsplittable(cfg, world_size))
    per_rank = total // world_size
    micro = micro or per_rank
    if per_rank % micro:
        fits = max(d for i in range(1, math.isqrt(per_rank) + 1) if per_rank % i == 0
                   for d in (i, per_rank // i) if d <= micro)
        images = "image" if per_rank == 1 else "images"
        raise ConfigError(f"train.micro_batch_size {micro} does not divide the {per_rank} {images} per rank "
                          f"(train.batch_size {total} over {world_size} ranks): set train.micro_batch_size "
                          f"to a divisor of {per_rank} (e.g. {fits})")
    return micro, per_rank // micro


def _unsplittable(cfg: Config, world_size: int) -> str:
    total, o = cfg.train.batch_size, cfg.optim
    start = (f"train.batch_size {total} cannot be split over {world_size} ranks: set train.batch_size to a "
             f"multiple of {world_size} (e.g. {-(-total // world_size) * world_size})")
    if o.scale_rule != "none":
        return (f"{start}; optim.scale_rule={o.scale_rule} scales optim.lr and optim.warmup_steps to it from "
                f"optim.reference_batch {o.reference_batch}")
    return (f"{start} with optim.scale_rule=linear (or sqrt) and optim.reference_batch={total} to scale "
            f"optim.lr and optim.warmup_steps")


def build_engine(cfg: Config, model: nn.Module, device: torch.device, dist_info: DistInfo) -> Engine:
    """Move `model` (a UNet, fp32, same initial weights on every rank) to the device and wrap it."""
    spec = ENGINES[cfg.engine]
    if spec.needs_group and not dist.is_initialized():
        raise RuntimeError(f"engine={cfg.engine} needs a process group: launch with torchrun or srun, "
                           f"or call init_distributed(always_group=True)")
    if not spec.needs_group and dist_info.world_size > 1:
        raise RuntimeError(f"engine={cfg.engine} runs one process, but world_size={dist_info.world_size}; "
                           f"use engine=ddp or engine=fsdp")
    settings = EngineSettings.of(cfg)
    device = torch.device(device)
    enable_cudnn_benchmark(device)
    model.to(device, memory_format=memory_format(device))
    # Whole-model compile where the wrapper leaves the module's forward alone (single, DDP);
    # FSDP2 and DeepSpeed hook every block, so each block is compiled between the hooks.
    apply_block_options(model, activation_checkpointing=settings.activation_checkpointing,
                        compile=compile_enabled(settings.compile, device), device=device,
                        precision=settings.precision, whole_model=not spec.wraps_blocks,
                        compile_mode=settings.compile_mode)
    if cfg.engine == "deepspeed":  # DeepSpeed takes the batch split into its own config
        return engine_class(cfg.engine)(settings, model, device, dist_info, *batch_split(cfg, dist_info.world_size))
    return engine_class(cfg.engine)(settings, model, device, dist_info)


def engine_class(name: str) -> type[Engine]:
    """The class of the engine registered as `name` (`engine_registry.ENGINES`); imported
    here, as DeepSpeed is an optional dependency."""
    if name == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine
        return DeepSpeedEngine
    from .torch_engines import DDPEngine, FSDPEngine, TorchEngine
    return {"single": TorchEngine, "ddp": DDPEngine, "fsdp": FSDPEngine}[name]
