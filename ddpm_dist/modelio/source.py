"""The network to evaluate: an exported model file, a training checkpoint folder, or random init.

Used by the evaluation tools (fid_sample, eval_nll) and benchmarks. A checkpoint folder is
read with a `single` engine in this process only (no process group yet), so every rank of a
sampling run loads the same EMA weights whatever engine and world size wrote them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ddpm_dist.config import Config, ConfigError, load_config
from ddpm_dist.diffusion import GaussianDiffusion
from ddpm_dist.engine_registry import CHECKPOINT_FORMATS, ENGINES, engines_writing
from ddpm_dist.modelio.factory import build_diffusion, build_model
from ddpm_dist.modelio.model_file import load_model_file, save_model_file
from ddpm_dist.unet import UNet


class ModelSourceError(ValueError):
    """The model to evaluate cannot be found or read; the message says what to pass instead."""


def _run_config(ckpt_dir: Path, config_path: str | None) -> Config:
    """--config if given, else the config.yaml that training saved in the run folder."""
    if config_path is not None:
        return load_config(config_path)
    for folder in (ckpt_dir, *ckpt_dir.parents[:3]):
        if (folder / "config.yaml").is_file():
            return load_config(folder / "config.yaml")
    raise ModelSourceError(f"{ckpt_dir}: no config.yaml in the run folder; pass --config CFG")


def load_checkpoint_ema(path: Path, config_path: str | None) -> tuple[UNet, GaussianDiffusion, Config]:
    """EMA weights of a DCP training checkpoint, via a single-process `single` engine."""
    from ddpm_dist.training.checkpoint import CheckpointError, find_checkpoint, load_checkpoint
    from ddpm_dist.distributed import DistInfo
    from ddpm_dist.training.engines import build_engine
    try:
        folder = find_checkpoint(path)
    except CheckpointError as e:
        raise ModelSourceError(str(e)) from None
    cfg = _run_config(folder, config_path)
    written_in = ENGINES[cfg.engine].checkpoint_format
    if not CHECKPOINT_FORMATS[written_in].reshards:
        raise ModelSourceError(f"{folder} was written by engine={cfg.engine}, whose format only "
                               f"{CHECKPOINT_FORMATS[written_in].label} reads back, on the same world size; "
                               f"evaluate or export {'/'.join(engines_writing('dcp'))} runs")
    # Plain fp32 module: no compile, no activation checkpointing, whatever training used.
    cfg = dataclasses.replace(cfg, engine="single", train=dataclasses.replace(
        cfg.train, compile="false", activation_checkpointing=False))
    model = build_model(cfg.model)
    engine = build_engine(cfg, model, torch.device("cpu"), DistInfo(0, 1, 0, torch.device("cpu"), True))
    try:
        load_checkpoint(folder, engine)
    except CheckpointError as e:
        raise ModelSourceError(str(e)) from None
    fresh = build_model(cfg.model)
    fresh.load_state_dict(engine.full_ema_state_dict())
    return fresh.eval(), build_diffusion(cfg.diffusion), cfg


def load_for_evaluation(ckpt: str | None, config_path: str | None = None, *,
                        random_init: bool = False) -> tuple[UNet, GaussianDiffusion]:
    """(network in eval mode, diffusion) from --ckpt / --config / --random-init."""
    if random_init:
        if config_path is None:
            raise ModelSourceError("--random-init builds the model from --config CFG; pass one")
        cfg = load_config(config_path)
        torch.manual_seed(0)  # the same untrained weights on every rank and every run
        return build_model(cfg.model).eval(), build_diffusion(cfg.diffusion)
    if ckpt is None:
        raise ModelSourceError("pass --ckpt (a model file or checkpoint folder) or --random-init")
    path = Path(ckpt)
    if not path.exists():
        raise ModelSourceError(f"checkpoint {path} does not exist")
    if path.is_dir():
        model, diffusion, _ = load_checkpoint_ema(path, config_path)
        return model, diffusion
    return load_model_file(path)



def export_checkpoint(run_or_checkpoint: str | Path, out: str | Path) -> None:
    """Write the EMA weights of a training checkpoint (or of a run's newest one) as a model file.
    Runs in one process: DCP reshards whatever world size wrote the checkpoint."""
    model, _, cfg = load_checkpoint_ema(Path(run_or_checkpoint), None)
    save_model_file(out, model.state_dict(), cfg)


def add_model_arguments(parser) -> None:
    """--config / --ckpt / --random-init, the model source of every evaluation tool."""
    parser.add_argument("--config", help="model config (YAML); for --random-init or a checkpoint folder")
    parser.add_argument("--ckpt", help="exported model file (.safetensors/.pt) or training checkpoint folder")
    parser.add_argument("--random-init", action="store_true", help="untrained weights (smoke tests)")


__all__ = ["ModelSourceError", "ConfigError", "add_model_arguments", "export_checkpoint", "load_for_evaluation",
           "load_checkpoint_ema"]
