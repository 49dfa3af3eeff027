"""The training engines by name and what their checkpoints are: the one table that config
validation (`config.CHOICES["engine"]`), engine building (`training.engines.build_engine`),
checkpoint checks (`training.checkpoint`) and model loading (`modelio.source`) read.

Adding an engine: its class under ddpm_dist/training/engines/, its entry here, and its
constructor call in `build_engine`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSpec:
    checkpoint_format: str  # what its `save` writes: a key of CHECKPOINT_FORMATS
    needs_group: bool       # runs under a process group (even with one rank)
    wraps_blocks: bool      # hooks every U-Net block (FSDP2, DeepSpeed): compiled per block, between the hooks


@dataclass(frozen=True)
class CheckpointFormat:
    label: str              # in messages
    reshards: bool          # loads on any world size, so one process can read it for evaluation


ENGINES = {
    "single": EngineSpec("dcp", needs_group=False, wraps_blocks=False),
    "ddp": EngineSpec("dcp", needs_group=True, wraps_blocks=False),
    "fsdp": EngineSpec("dcp", needs_group=True, wraps_blocks=True),
    "deepspeed": EngineSpec("deepspeed", needs_group=True, wraps_blocks=True),
}

CHECKPOINT_FORMATS = {
    "dcp": CheckpointFormat("DCP", reshards=True),
    "deepspeed": CheckpointFormat("DeepSpeed", reshards=False),
}


def engines_writing(checkpoint_format: str) -> list[str]:
    """The engines whose checkpoints are in `checkpoint_format`, in table order."""
    return [name for name, spec in ENGINES.items() if spec.checkpoint_format == checkpoint_format]
