"""What an engine reads of the run's config, taken from it in one place (`EngineSettings.of`), so
the engines depend on these few settings and not on the whole `Config`; and the FSDP mesh those
settings give on a world size (`fsdp_mesh_shape`)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ddpm_dist.config import Config, ConfigError, OptimConfig
from ddpm_dist.distributed import local_world_size


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
                   zero_stage=t.zero_stage, fsdp_shard_size=t.fsdp_shard_size,
                   activation_checkpointing=t.activation_checkpointing, compile=t.compile,
                   compile_mode=t.compile_mode)


def fsdp_mesh_shape(shard_size: int | None, world_size: int, env: dict | None = None) -> tuple[int, int]:
    """(replica groups, ranks per shard group) of engine=fsdp for train.fsdp_shard_size: None
    shards within a node (its size from the launcher's `env`; unknown or uneven nodes: one flat
    mesh), 0 over all ranks."""
    if shard_size is None:
        node = local_world_size(env)
        shard_size = node if node and world_size % node == 0 else 0
    if shard_size == 0:
        return 1, world_size
    if world_size % shard_size:
        raise ConfigError(f"train.fsdp_shard_size {shard_size} does not divide the {world_size} ranks: set it "
                          f"to a divisor of {world_size} (e.g. the ranks of one node), or 0 to shard over all ranks")
    return world_size // shard_size, shard_size
