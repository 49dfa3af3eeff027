"""Training engines behind one interface (see `base.Engine`): single, ddp, fsdp, deepspeed."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ddpm_dist.config import Config, ConfigError
from ddpm_dist.distributed import DistInfo
from ddpm_dist.engine_registry import ENGINES
from ddpm_dist.runtime import compile_enabled, enable_cudnn_benchmark, memory_format

from .base import DynamicLossScaler, Engine, StepResult, apply_block_options, checkpoint_format
from .settings import EngineSettings

__all__ = ["Engine", "StepResult", "DynamicLossScaler", "build_engine", "engine_class", "batch_split",
           "checkpoint_format", "EngineSettings"]


def batch_split(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, micro-batches per step) so the global batch holds on any world size;
    a ConfigError (one line, exit status 2) when the world size does not fit the batch."""
    total = cfg.train.batch_size
    micro = cfg.train.micro_batch_size or total // world_size
    if micro <= 0 or total % (micro * world_size):
        raise ConfigError(f"train.batch_size={total} is not a multiple of micro_batch_size={micro} "
                         f"x world_size={world_size}")
    return micro, total // (micro * world_size)


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
