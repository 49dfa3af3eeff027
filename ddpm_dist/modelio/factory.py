"""Build the network and the diffusion process from a config section."""
from __future__ import annotations

import dataclasses

from ddpm_dist.config import DiffusionConfig, ModelConfig
from ddpm_dist.diffusion import GaussianDiffusion, make_beta_schedule
from ddpm_dist.unet import UNet


def build_model(cfg: ModelConfig) -> UNet:
    return UNet(**dataclasses.asdict(cfg))


def build_diffusion(cfg: DiffusionConfig) -> GaussianDiffusion:
    return GaussianDiffusion(make_beta_schedule(cfg.schedule, cfg.num_timesteps),
                             model_mean_type=cfg.model_mean_type, model_var_type=cfg.model_var_type,
                             loss_type=cfg.loss_type)
