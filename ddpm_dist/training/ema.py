"""Exponential moving average of the weights (the paper evaluates the EMA, decay 0.9999).

The EMA lives beside whatever each rank holds of the parameters: whole tensors (single, DDP,
ZeRO-1/2), FSDP2's DTensor shards, or ZeRO-3 partitions. It is updated elementwise, so no rank
ever gathers the model per step (a per-step gather would cost a full all-gather of the
weights); gathering happens only to export.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (a view, so writes land in the sharded parameter)."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_views(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """What this rank holds of each parameter, as views that stay valid while the parameters
    live (FSDP2 keeps its shards in place), for `EMA.update`."""
    return [_local(t.detach()) for t in params]


class EMA:
    """fp32 shadow copies of `params`: ema <- decay * ema + (1 - decay) * param after each step."""

    def __init__(self, params: Sequence[torch.Tensor], decay: float, names: Sequence[str] | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        # Clone keeps DTensor placements: an FSDP2 shard's EMA is a shard of the same layout.
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in params]
        self.names = list(names) if names is not None else [str(i) for i in range(len(self.shadow))]
        assert len(self.names) == len(self.shadow), "one name per parameter"
        self._shadow_locals = local_views(self.shadow)  # views, made once: the step does no DTensor work

    @torch.no_grad()
    def update(self, local_params: Sequence[torch.Tensor], skip: torch.Tensor | None = None) -> None:
        """One EMA step over what this rank holds of the parameters (`local_views(params)`, made
        once by the caller): lerp(ema, p, 1 - decay), the paper's update. A fixed number of
        foreach ops whatever the number of tensors, each one multi-tensor kernel on CUDA (a 0-d
        weight tensor per parameter would send lerp down its one-kernel-per-tensor route).

        `skip` (a 0-d device tensor, 1.0 = skip) chooses lerp's target without a host sync: the
        parameters, or the EMA itself (lerp to itself leaves it unchanged). p·1 + ema·0 = p and
        p·0 + ema·1 = ema are exact for finite values, so the result is bit for bit that of a
        lerp weighted by (1 - skip)(1 - decay)."""
        src = [p.float() for p in local_params]  # no copy when already fp32
        if skip is not None:
            src = torch._foreach_mul(src, 1.0 - skip)
            torch._foreach_add_(src, torch._foreach_mul(self._shadow_locals, skip))
        torch._foreach_lerp_(self._shadow_locals, src, 1.0 - self.decay)

    @contextlib.contextmanager
    def swap_into(self, params: Sequence[torch.Tensor]) -> Iterator[None]:
        """Put the EMA weights into the live (possibly sharded) params, restore them on exit."""
        live = local_views(params)
        with torch.no_grad():
            saved = [p.clone() for p in live]
            torch._foreach_copy_(live, self._shadow_locals)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Keyed by parameter name; tensors as held (DTensor shards stay shards, for DCP)."""
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        for name, e in zip(self.names, self.shadow):
            if state[name] is not e:  # DCP loads in place: then there is nothing to copy
                _local(e).copy_(_local(state[name]))
