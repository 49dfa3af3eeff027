"""The single-file model used for sampling: EMA weights + the model and diffusion settings.

`.safetensors` (tensors + the settings as JSON metadata) or `.pt` (a dict of tensors and plain
values, loaded with `weights_only=True`). Neither format can run code when loaded.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ddpm_dist.config import Config, ConfigError, DiffusionConfig, ModelConfig, build_section, config_to_dict
from ddpm_dist.diffusion import GaussianDiffusion
from ddpm_dist.modelio.factory import build_diffusion, build_model
from ddpm_dist.unet import UNet
from ddpm_dist.utils.files import atomic_path

FORMAT = "ddpm-dist/1"


def save_model_file(path: str | Path, state_dict: dict[str, torch.Tensor], cfg: Config) -> None:
    """Write weights and settings to `path` (.safetensors or .pt) via a temp name + rename."""
    path = Path(path)
    settings = {"format": FORMAT, "model": config_to_dict(cfg)["model"],
                "diffusion": config_to_dict(cfg)["diffusion"]}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    if path.suffix not in (".safetensors", ".pt"):
        raise ValueError(f"{path}: model files end in .safetensors or .pt")
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(tensors, str(tmp), metadata={"ddpm_dist": json.dumps(settings)})
        else:
            torch.save({"settings": json.dumps(settings), "state_dict": tensors}, tmp)


def read_model_file(path: str | Path, weights: bool = True) -> tuple[dict[str, torch.Tensor], ModelConfig,
                                                                      DiffusionConfig]:
    """(tensors, settings); with `weights=False` a .safetensors file's header alone is read and
    the tensors are {} (a .pt file is read whole either way)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist (write one with tools/export.py)")
    try:
        raw, tensors = _read_raw(path, weights)
        settings = json.loads(raw) if raw is not None else None
    except Exception as e:  # safetensors, torch.load and json each raise their own types
        raise ValueError(f"{path} is not a readable model file ({_first_line(e)})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} is not a ddpm-dist model file (no settings); convert it with "
                         f"tools/convert_diffusers.py or export a checkpoint with tools/export.py")
    try:
        model_cfg = build_section(ModelConfig, settings["model"], "model.")
        diffusion_cfg = build_section(DiffusionConfig, settings["diffusion"], "diffusion.")
    except (KeyError, ConfigError) as e:
        raise ValueError(f"{path}: unreadable settings ({e})") from None
    return tensors, model_cfg, diffusion_cfg


def _read_raw(path: Path, weights: bool = True) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(settings JSON or None, tensors); raises whatever the file's reader raises."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()} if weights else {}
            return (f.metadata() or {}).get("ddpm_dist"), tensors
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict):
        raise ValueError(f"it holds a {type(blob).__name__}, not a dict of settings and weights")
    return blob.get("settings"), blob.get("state_dict", {})


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def load_model_file(path: str | Path) -> tuple[UNet, GaussianDiffusion]:
    """The network (eval mode, EMA weights) and its diffusion process."""
    tensors, model_cfg, diffusion_cfg = read_model_file(path)
    model = build_model(model_cfg)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise ValueError(f"{path}: weights do not fit the stored model settings "
                         f"({'missing' if missing else 'unexpected'} key {key})")
    return model.eval(), build_diffusion(diffusion_cfg)


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of the sampled weights (names, shapes, float32 bytes): the same for a .pt, a
    .safetensors file or a checkpoint folder holding the same EMA weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()
