"""Weights that every rank needs, read (and if need be downloaded) by rank 0 alone.

At 512 ranks a file read by every rank is 512 reads of it on the shared filesystem, and a
missing Inception file became one download per rank. Here rank 0 fetches and loads the file,
every other rank builds the same network untrained, and the weights go to them by broadcast
(NCCL's or gloo's tree, over the interconnect).
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ddpm_dist.distributed import DistInfo, any_flag


def broadcast_weights(module: nn.Module) -> None:
    """Rank 0's parameters and buffers into every rank's `module` (the same architecture, on
    the backend's device), in place; nothing outside a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in module.state_dict().values():  # views of the module's own storage
            dist.broadcast(tensor, src=0)


def load_inception_once(weights: str | None, info: DistInfo) -> nn.Module:
    """Collective: the FID Inception network with pytorch-fid's weights on every rank; only rank 0
    resolves `weights` (the file, torch.hub's cache, or one download) and reads it. If rank 0
    cannot, every rank raises."""
    from ddpm_dist.metrics.inception import FIDInceptionV3, load_inception
    model, error = None, None
    if info.is_main:
        try:
            model = load_inception(weights, info.device, allow_download=True)
        except (FileNotFoundError, ValueError) as e:
            error = e
    if any_flag(error is not None):
        raise error or FileNotFoundError("rank 0 could not load the Inception weights (its log says why)")
    if model is None:
        model = FIDInceptionV3().eval().requires_grad_(False).to(info.device)
    broadcast_weights(model)
    return model
