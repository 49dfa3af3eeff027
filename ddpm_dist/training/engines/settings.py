"""What an engine reads of the run's config, taken from it in one place (`EngineSettings.of`), so
the engines depend on these few settings and not on the whole `Config`."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ddpm_dist.config import Config, OptimConfig


@dataclass(frozen=True)
class EngineSettings:
    precision: str                  # "fp32" | "bf16" | "fp16": autocast, FSDP2 params, loss scaling
    ema_decay: float
    optim: OptimConfig              # Adam's lr/betas/eps and grad_clip (a copy: the engine's own)
    zero_stage: int                 # engine=deepspeed only
    fsdp_shard_size: int | None     # engine=fsdp only: ranks per shard group (`fsdp_mesh_shape`)
    activation_checkpointing: bool  # the block options `build_engine` applies before wrapping
    compile: str                    # "auto" | "true" | "false"
    compile_mode: str

    @classmethod
    def of(cls, cfg: Config) -> EngineSettings:
        t = cfg.train
        return cls(precision=t.precision, ema_decay=t.ema_decay, optim=replace(cfg.optim),
                   zero_stage=t.zero_stage,
                   fsdp_shard_size=t.fsdp_shard_size, activation_checkpointing=t.activation_checkpointing,
                   compile=t.compile, compile_mode=t.compile_mode)
