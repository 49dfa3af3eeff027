"""Weights that every rank needs, read (and if need be downloaded) by rank 0 alone.

At 512 ranks a file read by every rank is 512 reads of it on the shared filesystem, and a
missing Inception file became one download per rank. Here rank 0 fetches and loads the file,
every other rank builds the same network untrained, and the weights go to them by broadcast
(NCCL's or gloo's tree, over the interconnect).
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from torch import nn

from ddpm_dist.distributed import DistInfo, any_flag


def broadcast_weights(module: nn.Module) -> None:
    """Rank 0's parameters and buffers into every rank's `module` (the same architecture, on
    the backend's device), in place; nothing outside a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in module.state_dict().values():  # views of the module's own storage
            dist.broadcast(tensor, src=0)


def load_model_once(ckpt: str | None, config: str | None, random_init: bool, info: DistInfo):
    """Collective: (network in eval mode on `info.device`, diffusion) to evaluate, on every rank.
    From a .safetensors model file rank 0 reads the weights and broadcasts them, the other ranks
    read only the file's header (the settings); a checkpoint folder, a .pt file and
    --random-init are read by every rank. If rank 0 cannot load, every rank raises."""
    from ddpm_dist.modelio.factory import build_diffusion, build_model
    from ddpm_dist.modelio.model_file import read_model_file
    from ddpm_dist.modelio.source import load_for_evaluation
    if random_init or ckpt is None or Path(ckpt).suffix != ".safetensors" or not dist.is_initialized():
        model, diffusion = load_for_evaluation(ckpt, config, random_init=random_init)
        return model.to(info.device), diffusion
    loaded, error = None, None
    try:
        if info.is_main:
            loaded = load_for_evaluation(ckpt, config)
        else:
            _, model_cfg, diffusion_cfg = read_model_file(ckpt, weights=False)
            loaded = build_model(model_cfg).eval(), build_diffusion(diffusion_cfg)
    except (FileNotFoundError, ValueError) as e:
        error = e
    if any_flag(error is not None):
        raise error or ValueError(f"rank 0 could not load {ckpt} (its log says why)")
    model, diffusion = loaded
    broadcast_weights(model.to(info.device))
    return model, diffusion


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
