"""The interface every engine keeps, and the pieces they share (loss scaling, block options).

`ddpm_dist.training.step.train_step` is the one user of the step methods: per micro-batch
`no_sync` (all but the last), `autocast`, `backward`; then `step(lr)` (clip, Adam, zero grads,
EMA). Checkpoints go through `save(folder)` / `load(folder)`: each engine writes and reads its
own state in its own format (DCP for the torch engines, DeepSpeed's for DeepSpeed);
`ddpm_dist.training.checkpoint` only names, publishes and rotates the folders.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddpm_dist.distributed import any_flag
from ddpm_dist.runtime import guard_cpu_compile, memory_format
from ddpm_dist.training.ema import EMA, local_views
from .block_compile import compile_blocks

DEEPSPEED_TAG = "deepspeed"  # the sub-folder DeepSpeed's own checkpoint format lives in


@dataclass(frozen=True)
class StepResult:
    """Device tensors (0-d): reading them is a host sync, so the loop reads them only to log."""
    grad_norm: torch.Tensor  # global norm before clipping (inf/nan when the step was skipped)
    skipped: torch.Tensor    # bool: gradients were non-finite and the parameters did not move


def checkpoint_format(folder: Path) -> str:
    """Which engine family wrote a checkpoint folder: "deepspeed" or "dcp"."""
    return "deepspeed" if (Path(folder) / DEEPSPEED_TAG).is_dir() else "dcp"


class Engine:
    """A wrapped model + Adam + EMA (+ loss scaler). Subclasses fill in the methods."""

    model: nn.Module   # call as engine.model(x, t) for training forward passes
    module: nn.Module  # the plain UNet inside (for names; its weights may be sharded)
    ema: EMA
    device: torch.device
    checkpoint_format: str  # what `save` writes: "dcp" or "deepspeed"
    # True when a step with non-finite gradients leaves the weights untouched (`StepResult.skipped`).
    skips_nonfinite_steps: bool = True

    @property
    def memory_format(self) -> torch.memory_format:
        return memory_format(self.device)

    def autocast(self) -> ContextManager:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """`sync=False` on every micro-batch but the last of an optimizer step."""
        raise NotImplementedError

    def no_sync(self) -> ContextManager:
        """Wrap forward *and* backward of a non-final micro-batch to skip its gradient
        all-reduce. DDP decides at forward time, so `backward(sync=False)` alone still reduces
        there (correct, only slower); FSDP2 and DeepSpeed need nothing beyond `sync`."""
        return contextlib.nullcontext()

    def step(self, lr: float) -> StepResult:
        """Unscale, clip to optim.grad_clip (global norm), skip if non-finite, Adam at `lr`,
        zero the gradients, update the EMA."""
        raise NotImplementedError

    def local_params(self) -> list[torch.Tensor]:
        """What this rank holds of each parameter, in the EMA's order."""
        raise NotImplementedError

    def weights_finite(self) -> bool:
        """Collective: True on every rank when no rank holds a non-finite weight."""
        local = bool(torch.stack([torch.isfinite(t).all() for t in local_views(self.local_params())]).all())
        return not any_flag(not local)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Inside: engine.model computes with the EMA weights, in eval mode (no dropout)."""
        was_training = self.module.training
        self.module.eval()
        try:
            with self.ema.swap_into(self.local_params()):
                yield
        finally:
            self.module.train(was_training)

    def save(self, folder: Path) -> None:
        """Collective: write model, optimizer, EMA and scaler state into `folder`."""
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        """Collective: read what `save` wrote (any exception means it does not fit)."""
        raise NotImplementedError

    def full_ema_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Plain CPU EMA tensors with UNet.state_dict() keys on rank 0, None elsewhere.
        A collective under sharding: every rank must call it."""
        raise NotImplementedError


class DynamicLossScaler:
    """fp16 loss scaling with torch.amp.GradScaler's constants. Our own because the skip decision
    must come from the *global* gradient norm: under FSDP2 each rank sees only its shard, and
    GradScaler's per-rank inf check would let ranks disagree on whether to step. The scale and
    the clean-step count live on the device and are updated there: no host sync per step."""

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, device="cpu"):
        self.enabled = enabled
        self.scale = torch.tensor(init_scale if enabled else 1.0, dtype=torch.float32, device=device)
        self.growth_tracker = torch.tensor(0, dtype=torch.int32, device=device)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, params: list[nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if self.enabled and grads:
            torch._foreach_mul_(grads, self.scale.reciprocal())

    def update(self, found_inf: torch.Tensor) -> None:
        """Back off after an overflow; grow after `growth_interval` clean steps in a row."""
        if self.enabled:
            torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf, self.growth_factor,
                                     self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": self.scale.to("cpu", torch.float64), "growth_tracker": self.growth_tracker.to("cpu", torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])


def _checkpointed(forward, *args):
    # use_reentrant=False: works with FSDP2 hooks and inputs that do not require grad.
    return checkpoint(forward, *args, use_reentrant=False)


def apply_block_options(model: nn.Module, *, activation_checkpointing: bool, compile: bool,
                        device: torch.device, precision: str, whole_model: bool = True,
                        compile_mode: str = "default") -> None:
    """Per-Block activation checkpointing, and torch.compile of the whole model (or of each Block
    when `whole_model` is False), in place, so parameter names (and so checkpoints) stay those of
    the plain UNet. The U-Net's forward traces as one graph (no graph breaks). Call before
    sharding."""
    if compile:
        guard_cpu_compile(device, precision)
    if activation_checkpointing:
        for block in model.blocks():
            block.forward = functools.partial(_checkpointed, block.forward)
    if compile and not whole_model:
        compile_blocks(model, model.blocks(), compile_mode)  # each block through its own frame
    if compile and whole_model:
        model.compile(mode=compile_mode)
