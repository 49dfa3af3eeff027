"""Diffusers interoperability: a diffusers DDPM folder (UNet2DModel + DDPMScheduler, e.g.
google/ddpm-cifar10-32) to our model file, and back.

diffusers' UNet2DModel with the google/ddpm-* settings is the paper's network under other
names; this module renames and reshapes tensors and translates the two config files. It
reads JSON and tensors only, so it works without diffusers installed (tests use diffusers to
check that the outputs agree). Every setting or key that does not fit raises one
`ConversionError` naming it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch

from ddpm_dist.config import Config, DiffusionConfig, ModelConfig
from ddpm_dist.modelio.model_file import read_model_file, save_model_file
from ddpm_dist.modelio.factory import build_model

# UNet2DModel.__init__ defaults (diffusers 0.42), applied to keys a config.json leaves out
# so that an old, short config means what diffusers would read it as.
UNET_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}

# The values of those settings that make UNet2DModel compute exactly our UNet (paper App. B):
# GroupNorm(32, 1e-6), swish, [sin, cos] embedding with f_i = 10000^(-i/(half-1)), TF "SAME"
# stride-2 conv (pad right/bottom = downsample_padding 0), nearest upsample + conv, no extras.
UNET_REQUIRED = {
    "center_input_sample": [False], "time_embedding_type": ["positional"], "freq_shift": [1],
    "flip_sin_to_cos": [False], "mid_block_type": ["UNetMidBlock2D"], "mid_block_scale_factor": [1],
    "downsample_padding": [0], "downsample_type": ["conv"], "upsample_type": ["conv"],
    "act_fn": ["silu", "swish"], "norm_num_groups": [32], "attn_norm_num_groups": [None, 32],
    "norm_eps": [1e-6], "resnet_time_scale_shift": ["default"], "add_attention": [True],
    "class_embed_type": [None], "num_class_embeds": [None],
}

# DDPMScheduler.__init__ defaults (diffusers 0.42).
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True,
    "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
    "steps_offset": 0, "rescale_betas_zero_snr": False,
}

# Our sampler always clips x̂_0 to [-1, 1] (the original code's p_sample) and takes its β from
# make_beta_schedule; timestep_spacing/steps_offset only pick inference timesteps (our --steps).
SCHEDULER_REQUIRED = {
    "trained_betas": [None], "clip_sample": [True], "clip_sample_range": [1.0],
    "thresholding": [False], "rescale_betas_zero_snr": [False],
}
# diffusers 0.1-era scheduler key (numpy or torch arrays), which diffusers itself now ignores.
OBSOLETE_SCHEDULER_KEYS = ("tensor_format",)
VARIANCE_TYPES = {"fixed_large": "fixedlarge", "fixed_small": "fixedsmall"}
PREDICTION_TYPES = {"epsilon": "eps", "sample": "xstart"}
# Attention projections are 1x1 convs in our UNet and Linear layers in diffusers.
LINEAR_IN_DIFFUSERS = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")
# Names of diffusers' deprecated AttentionBlock, found in older uploads; diffusers renames them alike.
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Leaf module names that differ: ResBlock and AttnBlock children, ours → diffusers.
LEAF_NAMES = {"temb_proj": "time_emb_proj", "shortcut": "conv_shortcut", "norm": "group_norm",
              "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


class ConversionError(ValueError):
    """A diffusers folder or model file that does not map onto our UNet; the message names what."""


# ---- configs --------------------------------------------------------------------------------
def _with_defaults(cfg: dict, defaults: dict, what: str) -> dict:
    """`cfg` over `defaults`; a key neither knows (bar diffusers' `_` bookkeeping) is an error."""
    unknown = [k for k in cfg if k not in defaults and not k.startswith("_")]
    if unknown:
        raise ConversionError(f"unsupported {what} setting {unknown[0]!r}={cfg[unknown[0]]!r}")
    return {**defaults, **{k: v for k, v in cfg.items() if k in defaults}}


def _require(cfg: dict, required: dict, what: str) -> None:
    for key, allowed in required.items():
        if cfg[key] not in allowed:
            raise ConversionError(f"unsupported {what} setting {key}={cfg[key]!r}: our UNet and "
                                  f"sampler need {' or '.join(map(repr, allowed))}")


def _attention_resolutions(cfg: dict) -> tuple[int, ...]:
    """Resolutions with attention; our UNet has it on the way down and up at the same ones."""
    res, n = cfg["sample_size"], len(cfg["down_block_types"])
    down = {res >> i for i, b in enumerate(cfg["down_block_types"]) if b == "AttnDownBlock2D"}
    up = {res >> (n - 1 - i) for i, b in enumerate(cfg["up_block_types"]) if b == "AttnUpBlock2D"}
    if down != up:
        raise ConversionError(f"unsupported UNet2DModel setting up_block_types={cfg['up_block_types']}: "
                              f"attention at {sorted(up)} on the way up but {sorted(down)} on the way down")
    return tuple(sorted(down, reverse=True))


def _check_blocks(cfg: dict) -> None:
    for key, kinds in (("down_block_types", ("DownBlock2D", "AttnDownBlock2D")),
                       ("up_block_types", ("UpBlock2D", "AttnUpBlock2D"))):
        bad = [b for b in cfg[key] if b not in kinds]
        if bad or len(cfg[key]) != len(cfg["block_out_channels"]):
            raise ConversionError(f"unsupported UNet2DModel setting {key}={cfg[key]}: one of "
                                  f"{kinds} per entry of block_out_channels={cfg['block_out_channels']}")


def _single_head(cfg: dict, ch_mult, ch: int, attn_resolutions) -> None:
    """The paper's attention has one head; diffusers gives width // attention_head_dim heads."""
    head_dim = cfg["attention_head_dim"]
    widths = {ch * m for i, m in enumerate(ch_mult) if cfg["sample_size"] >> i in attn_resolutions}
    widths.add(ch * ch_mult[-1])  # the middle block's attention
    if head_dim is not None and widths != {head_dim}:
        raise ConversionError(f"unsupported UNet2DModel setting attention_head_dim={head_dim}: "
                              f"our attention has one head (None, or the width {sorted(widths)})")


def _sample_size(value) -> int:
    if isinstance(value, (list, tuple)) and len(set(value)) == 1:
        value = value[0]
    if not isinstance(value, int):
        raise ConversionError(f"unsupported UNet2DModel setting sample_size={value!r}: a square size")
    return value


def model_config_from_unet(unet_cfg: dict) -> ModelConfig:
    """ModelConfig of the UNet2DModel `config.json` mapping; ConversionError if not the paper's net."""
    cfg = _with_defaults(unet_cfg, UNET_DEFAULTS, "UNet2DModel")
    _require(cfg, UNET_REQUIRED, "UNet2DModel")
    cfg["sample_size"] = _sample_size(cfg["sample_size"])
    _check_blocks(cfg)
    widths = list(cfg["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ConversionError(f"unsupported UNet2DModel setting block_out_channels={widths}: "
                              f"each width must be a multiple of the first")
    if cfg["time_embedding_dim"] not in (None, 4 * ch):
        raise ConversionError(f"unsupported UNet2DModel setting time_embedding_dim="
                              f"{cfg['time_embedding_dim']}: ours is 4 * {ch}")
    ch_mult, attn = tuple(w // ch for w in widths), _attention_resolutions(cfg)
    _single_head(cfg, ch_mult, ch, attn)
    return ModelConfig(ch=ch, out_ch=cfg["out_channels"], ch_mult=ch_mult,
                       num_res_blocks=cfg["layers_per_block"], attn_resolutions=attn,
                       dropout=float(cfg["dropout"]), resamp_with_conv=True,
                       in_channels=cfg["in_channels"], resolution=cfg["sample_size"])


def _schedule(cfg: dict) -> str:
    """Our schedule name for diffusers' β settings: the paper's linear 1e-4 → 0.02, or cosine."""
    if cfg["beta_schedule"] == "squaredcos_cap_v2":
        return "cosine"  # both: Nichol & Dhariwal Eq. 17 with s = 0.008, β ≤ 0.999
    paper = math.isclose(cfg["beta_start"], 1e-4) and math.isclose(cfg["beta_end"], 0.02)
    if cfg["beta_schedule"] == "linear" and paper:
        return "linear"
    raise ConversionError(f"unsupported DDPMScheduler setting beta_schedule={cfg['beta_schedule']!r} "
                          f"(beta_start={cfg['beta_start']}, beta_end={cfg['beta_end']}): ours are "
                          f"'linear' 0.0001 → 0.02 and 'squaredcos_cap_v2'")


def _lookup(table: dict, cfg: dict, key: str, what: str):
    if cfg[key] not in table:
        raise ConversionError(f"unsupported {what} setting {key}={cfg[key]!r}: "
                              f"supported are {', '.join(map(repr, table))}")
    return table[cfg[key]]


def diffusion_config_from_scheduler(scheduler_cfg: dict) -> DiffusionConfig:
    """DiffusionConfig of a DDPMScheduler `scheduler_config.json` mapping."""
    current = {k: v for k, v in scheduler_cfg.items() if k not in OBSOLETE_SCHEDULER_KEYS}
    cfg = _with_defaults(current, SCHEDULER_DEFAULTS, "DDPMScheduler")
    _require(cfg, SCHEDULER_REQUIRED, "DDPMScheduler")
    return DiffusionConfig(
        schedule=_schedule(cfg), num_timesteps=int(cfg["num_train_timesteps"]),
        model_mean_type=_lookup(PREDICTION_TYPES, cfg, "prediction_type", "DDPMScheduler"),
        model_var_type=_lookup(VARIANCE_TYPES, cfg, "variance_type", "DDPMScheduler"))


def unet_config(model_cfg: ModelConfig) -> dict:
    """UNet2DModel config.json for our ModelConfig: every key written, no defaults relied on."""
    if not model_cfg.resamp_with_conv:
        raise ConversionError("unsupported model setting resamp_with_conv=False: UNet2DModel "
                              "always resamples with a conv")
    n, res = len(model_cfg.ch_mult), model_cfg.resolution
    attn = set(model_cfg.attn_resolutions)
    down = ["AttnDownBlock2D" if res >> i in attn else "DownBlock2D" for i in range(n)]
    up = ["AttnUpBlock2D" if res >> (n - 1 - i) in attn else "UpBlock2D" for i in range(n)]
    cfg = {**UNET_DEFAULTS, **{k: v[0] for k, v in UNET_REQUIRED.items()}}
    cfg.update(sample_size=res, in_channels=model_cfg.in_channels, out_channels=model_cfg.out_ch,
               down_block_types=down, up_block_types=up, attention_head_dim=None,
               block_out_channels=[model_cfg.ch * m for m in model_cfg.ch_mult],
               layers_per_block=model_cfg.num_res_blocks, dropout=model_cfg.dropout)
    return {"_class_name": "UNet2DModel", **_version(), **cfg}


def scheduler_config(diffusion_cfg: DiffusionConfig) -> dict:
    """DDPMScheduler scheduler_config.json for our DiffusionConfig."""
    if diffusion_cfg.model_mean_type not in PREDICTION_TYPES.values():
        raise ConversionError(f"unsupported diffusion setting model_mean_type="
                              f"{diffusion_cfg.model_mean_type!r}: DDPMScheduler predicts "
                              f"epsilon or sample")
    invert = lambda table, value: next(k for k, v in table.items() if v == value)  # noqa: E731
    beta_schedule = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[diffusion_cfg.schedule]
    return {"_class_name": "DDPMScheduler", **_version(), **SCHEDULER_DEFAULTS,
            "num_train_timesteps": diffusion_cfg.num_timesteps, "beta_schedule": beta_schedule,
            "variance_type": invert(VARIANCE_TYPES, diffusion_cfg.model_var_type),
            "prediction_type": invert(PREDICTION_TYPES, diffusion_cfg.model_mean_type)}


def _version() -> dict:
    """diffusers records its version in each config; read from metadata, not by importing it."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return {"_diffusers_version": version("diffusers")}
    except PackageNotFoundError:
        return {}


# ---- weights ------------------------------------------------------------------------------
def _block_prefixes(ours: str, theirs: str, j: int) -> list[tuple[str, str]]:
    return [(f"{ours}.res", f"{theirs}.resnets.{j}"), (f"{ours}.attn", f"{theirs}.attentions.{j}")]


def _module_prefixes(num_levels: int, num_res_blocks: int) -> dict[str, str]:
    """Our module path → diffusers' for every module that holds tensors (UNet.__init__ order)."""
    pairs = [("temb.0", "time_embedding.linear_1"), ("temb.2", "time_embedding.linear_2"),
             ("conv_in", "conv_in"), ("norm_out", "conv_norm_out"), ("conv_out", "conv_out"),
             ("mid.0.res", "mid_block.resnets.0"), ("mid.0.attn", "mid_block.attentions.0"),
             ("mid.1.res", "mid_block.resnets.1")]
    for path, blocks_per_level, resample in (("down", num_res_blocks, "downsamplers"),
                                             ("up", num_res_blocks + 1, "upsamplers")):
        k = 0
        for level in range(num_levels):
            theirs = f"{path}_blocks.{level}"
            for j in range(blocks_per_level):
                pairs += _block_prefixes(f"{path}.{k}", theirs, j)
                k += 1
            if level != num_levels - 1:
                pairs.append((f"{path}.{k}.conv", f"{theirs}.{resample}.0.conv"))
                k += 1
    return dict(pairs)


def _diffusers_key(key: str, prefixes: dict[str, str]) -> str:
    """diffusers' name of our state-dict key, e.g. down.3.res.temb_proj.weight →
    down_blocks.1.resnets.1.time_emb_proj.weight."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            leaf = [LEAF_NAMES.get(parts[cut], parts[cut])] + parts[cut + 1:]
            return ".".join([prefixes[head], *leaf])
    raise KeyError(f"no diffusers name for {key}")


def key_map(model_cfg: ModelConfig) -> dict[str, tuple[str, torch.Size]]:
    """diffusers key → (our key, our shape) for the UNet of `model_cfg`."""
    with torch.device("meta"):  # names and shapes only
        shapes = {k: v.shape for k, v in build_model(model_cfg).state_dict().items()}
    prefixes = _module_prefixes(len(model_cfg.ch_mult), model_cfg.num_res_blocks)
    return {_diffusers_key(k, prefixes): (k, s) for k, s in shapes.items()}


def _diffusers_shape(key: str, shape: torch.Size) -> torch.Size:
    return shape[:2] if LINEAR_IN_DIFFUSERS.search(key) else shape


def _modern_name(key: str) -> str:
    """attentions.N.query.weight → attentions.N.to_q.weight (diffusers' own legacy renaming)."""
    return re.sub(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.",
                  lambda m: m.group(1) + LEGACY_ATTENTION[m.group(2)] + ".", key)


def state_dict_from_diffusers(tensors: dict[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict from UNet2DModel tensors; the first key that does not fit is the error."""
    expected, out = key_map(model_cfg), {}
    for name, tensor in tensors.items():
        key = _modern_name(name)
        if key not in expected:
            raise ConversionError(f"unexpected key {name} for the UNet of {_describe(model_cfg)}")
        ours, shape = expected[key]
        if tensor.shape != _diffusers_shape(key, shape):
            raise ConversionError(f"key {name} has shape {list(tensor.shape)}, expected "
                                  f"{list(_diffusers_shape(key, shape))}")
        out[ours] = tensor.reshape(shape).float()
    missing = [k for k, (ours, _) in expected.items() if ours not in out]
    if missing:
        raise ConversionError(f"missing key {missing[0]} for the UNet of {_describe(model_cfg)}")
    return out


def state_dict_to_diffusers(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """UNet2DModel tensors (current names) from our state dict."""
    ours_to_theirs = {ours: (key, shape) for key, (ours, shape) in key_map(model_cfg).items()}
    for name in [*state_dict, *ours_to_theirs]:
        if name not in state_dict or name not in ours_to_theirs:
            raise ConversionError(f"{'unexpected' if name in state_dict else 'missing'} key {name} "
                                  f"for the UNet of {_describe(model_cfg)}")
    return {key: state_dict[name].reshape(_diffusers_shape(key, shape)).contiguous()
            for name, (key, shape) in ours_to_theirs.items()}


def _describe(model_cfg: ModelConfig) -> str:
    return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(model_cfg).items() if k != "dropout")


# ---- folders ------------------------------------------------------------------------------
def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)  # no pickled code runs


def read_diffusers_folder(folder: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, DiffusionConfig]:
    """Our state dict and settings from a diffusers DDPM folder: unet/ + scheduler/ (as
    DDPMPipeline.save_pretrained writes) or the same files at the top (the google/ddpm-* layout)."""
    folder = Path(folder)
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    config = _first_existing(unet_dir / "config.json")
    weights = _first_existing(unet_dir / "diffusion_pytorch_model.safetensors",
                              unet_dir / "diffusion_pytorch_model.bin")
    scheduler = _first_existing(folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json")
    for path, what in ((config, "config.json"), (weights, "diffusion_pytorch_model.safetensors or .bin"),
                       (scheduler, "scheduler_config.json")):
        if path is None:
            raise ConversionError(f"{folder}: no {what} (looked in {folder}/unet, {folder}/scheduler "
                                  f"and {folder})")
    model_cfg = model_config_from_unet(_read_json(config))
    diffusion_cfg = diffusion_config_from_scheduler(_read_json(scheduler))
    return state_dict_from_diffusers(_load_tensors(weights), model_cfg), model_cfg, diffusion_cfg


def import_diffusers(folder: str | Path, out: str | Path) -> Config:
    """Write our model file `out` (.safetensors or .pt) from a diffusers DDPM folder."""
    state_dict, model_cfg, diffusion_cfg = read_diffusers_folder(folder)
    cfg = Config(model=model_cfg, diffusion=diffusion_cfg)
    save_model_file(out, state_dict, cfg)
    return cfg


def export_diffusers(model_file: str | Path, out_dir: str | Path) -> None:
    """Write a DDPMPipeline folder (model_index.json, unet/, scheduler/) from our model file."""
    state_dict, model_cfg, diffusion_cfg = read_model_file(model_file)
    tensors = state_dict_to_diffusers(state_dict, model_cfg)
    configs = {"unet/config.json": unet_config(model_cfg),
               "scheduler/scheduler_config.json": scheduler_config(diffusion_cfg),
               "model_index.json": {"_class_name": "DDPMPipeline", **_version(),
                                    "unet": ["diffusers", "UNet2DModel"],
                                    "scheduler": ["diffusers", "DDPMScheduler"]}}
    out_dir = Path(out_dir)
    for name, cfg in configs.items():
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_text(json.dumps(cfg, indent=2) + "\n")
    from safetensors.torch import save_file
    save_file(tensors, str(out_dir / "unet" / "diffusion_pytorch_model.safetensors"))
