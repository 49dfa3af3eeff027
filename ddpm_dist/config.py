"""Typed run configuration: dataclasses, YAML loading, `key.sub=value` overrides, validation.

A config is data: `load_config(path, overrides)` gives a `Config`; `config_to_dict` gives the
plain mapping that is saved next to every run, so a run can be reproduced from its folder.
Every error is a `ConfigError` with one line naming the bad key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ddpm_dist.utils.files import atomic_write
from ddpm_dist.utils.urls import credentials_error


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and what is allowed."""


@dataclass
class ModelConfig:
    """Keyword arguments of `ddpm_dist.unet.UNet`."""
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    in_channels: int = 3
    resolution: int = 32


@dataclass
class DiffusionConfig:
    schedule: str = "linear"
    num_timesteps: int = 1000
    model_mean_type: str = "eps"
    model_var_type: str = "fixedlarge"
    loss_type: str = "mse"


@dataclass
class DataConfig:
    # "digits" (the embedded scikit-learn set) or shards written by tools/make_shards.py:
    # a local folder or an s3://bucket/prefix/ URL holding index.json.
    source: str = "digits"
    flip: bool = True
    num_workers: int = 0
    s3_endpoint: str | None = None  # else AWS_ENDPOINT_URL from the environment
    retries: int = 5
    retry_wait: float = 1.0  # first backoff (s), doubled per retry up to 30 s: 5 retries ≈ 31 s
    # Skipped samples (corrupt, or in shards that fail their checksum) above this fraction of
    # what a stream has read stop the run; measured once a stream has read 1,000 samples.
    max_skip_fraction: float = 0.01


@dataclass
class OptimConfig:
    """Adam as in the paper: no weight decay, linear warm-up, gradient clipping."""
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 5000
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    batch_size: int = 128  # global: split across ranks (and micro-batches)
    micro_batch_size: int | None = None  # per rank; None = batch_size // world_size
    total_steps: int = 800_000
    ema_decay: float = 0.9999
    precision: str = "fp32"
    activation_checkpointing: bool = False
    # torch.compile of the U-Net: "auto" = on CUDA, off on CPU (Inductor's AVX-512 bf16 code
    # gave wrong gradients on some CPUs); "true" / "false" force it.
    compile: str = "auto"
    # torch.compile's mode where compile is on. "reduce-overhead" replays the compiled U-Net as
    # CUDA graphs (the step reads nothing back from the GPU between log points, so it can).
    compile_mode: str = "default"
    zero_stage: int = 2  # engine=deepspeed only: ZeRO stage 0-3
    log_every: int = 100
    sample_every: int = 10_000
    num_samples: int = 64
    ckpt_every: int = 5_000
    keep_last: int = 3
    # A collective that waits longer than this (s) fails on every live rank: a dead or stopped
    # rank ends the job instead of hanging it. It must exceed the longest legitimate wait (a
    # checkpoint write, the first compiled step).
    collective_timeout: float = 600.0
    # The same once training steps run (at most collective_timeout): a node lost mid-run, even a
    # silent one, ends the job this soon. Checkpoint writes and sample grids keep the long one.
    step_timeout: float = 90.0
    # No finished step for this long (s) dumps every thread's stack and exits with status 6;
    # 0 turns the watchdog off.
    hang_timeout: float = 1800.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: str = "single"
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"


# Keys that configs no longer have but config.yaml files saved with earlier runs and
# checkpoints still hold; loading drops them, so those runs still resume and export.
RETIRED_KEYS = ("data.shuffle_buffer",)


def _drop_retired(data: dict) -> None:
    for key in RETIRED_KEYS:
        section, _, name = key.rpartition(".")
        node = data.get(section) if section else data
        if isinstance(node, dict):
            node.pop(name, None)


# Allowed values of the string-valued settings; validated after loading.
CHOICES = {
    "diffusion.schedule": ("linear", "cosine"),
    "diffusion.model_mean_type": ("eps", "xstart", "mean"),
    "diffusion.model_var_type": ("fixedlarge", "fixedsmall"),
    "diffusion.loss_type": ("mse", "kl"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.compile": ("auto", "true", "false"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "engine": ("single", "ddp", "fsdp", "deepspeed"),
    "device": ("auto", "cpu", "cuda"),
}


def _convert(value, tp, key: str):
    """Coerce a YAML/override value to the field's annotated type, or raise a ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), key)
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_convert(v, args[0], key) for v in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # PyYAML reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is str and isinstance(value, bool):  # YAML reads true/false as booleans
        return "true" if value else "false"
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def build_section(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s}; allowed keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _convert(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _set_override(data: dict, item: str) -> None:
    """Apply one `a.b=value` override (value parsed as YAML) to a nested mapping."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[leaf] = value


def _check_choices(cfg: Config) -> None:
    flat = config_to_dict(cfg)
    for key, allowed in CHOICES.items():
        section, _, name = key.rpartition(".")
        value = flat[section][name] if section else flat[name]
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _check_ranges(cfg: Config) -> None:
    t = cfg.train
    micro = 1 if t.micro_batch_size is None else t.micro_batch_size
    positive = {"model.ch": cfg.model.ch, "model.num_res_blocks": cfg.model.num_res_blocks,
                "model.resolution": cfg.model.resolution, "diffusion.num_timesteps": cfg.diffusion.num_timesteps,
                "train.batch_size": t.batch_size, "train.total_steps": t.total_steps, "optim.lr": cfg.optim.lr,
                "train.log_every": t.log_every, "train.sample_every": t.sample_every,
                "train.ckpt_every": t.ckpt_every, "train.micro_batch_size": micro}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if not 0.0 <= cfg.data.max_skip_fraction < 1.0:
        raise ConfigError(f"data.max_skip_fraction: must be in [0, 1), got {cfg.data.max_skip_fraction}")
    if t.keep_last < 1:
        raise ConfigError(f"train.keep_last: must be at least 1, got {t.keep_last} "
                          f"(the number of newest checkpoints kept)")
    for key, value in (("collective_timeout", t.collective_timeout), ("step_timeout", t.step_timeout)):
        if value <= 0:
            raise ConfigError(f"train.{key}: must be positive (seconds), got {value}")
    at_least_0 = {"data.retries": cfg.data.retries, "data.num_workers": cfg.data.num_workers,
                  "data.retry_wait": cfg.data.retry_wait, "train.hang_timeout": t.hang_timeout}
    for key, value in at_least_0.items():
        if value < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {value}")
    if t.micro_batch_size is not None and t.batch_size % t.micro_batch_size:
        # every world size W needs batch_size % (micro_batch_size * W) == 0 (checked at start)
        raise ConfigError(f"train.micro_batch_size: {t.micro_batch_size} does not divide "
                          f"train.batch_size={t.batch_size}")


def _check_urls(cfg: Config) -> None:
    """URLs are saved with the run and show in errors: no credentials inside them."""
    for key, url in (("data.source", cfg.data.source), ("data.s3_endpoint", cfg.data.s3_endpoint)):
        message = credentials_error(url, key)
        if message:
            raise ConfigError(message)


def _check_model(cfg: Config) -> None:
    if cfg.model.ch % 32:
        raise ConfigError(f"model.ch: must be a multiple of 32 (GroupNorm has 32 groups), got {cfg.model.ch}")
    if cfg.model.resolution % 2 ** (len(cfg.model.ch_mult) - 1):
        raise ConfigError(f"model.resolution: {cfg.model.resolution} is not divisible by "
                          f"2^{len(cfg.model.ch_mult) - 1} (one halving per extra ch_mult level)")
    levels = [cfg.model.resolution // 2 ** k for k in range(len(cfg.model.ch_mult))]
    for res in cfg.model.attn_resolutions:
        if res not in levels:
            raise ConfigError(f"model.attn_resolutions: {res} is not a resolution of the U-Net "
                              f"({', '.join(map(str, levels))}); attention there would never run")
    _check_channels(cfg.model)
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {cfg.model.dropout}")


def validate(cfg: Config) -> Config:
    _check_urls(cfg)  # first: no later message may quote a URL with credentials
    _check_choices(cfg)
    _check_ranges(cfg)
    _check_model(cfg)
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {cfg.train.ema_decay}")
    return cfg


def _check_channels(model: ModelConfig) -> None:
    """Data, sample grids and FID know grey (1) and RGB (3) images; the network predicts ε (or
    x_0, or the mean) of the image, so its output has the image's channels."""
    if model.in_channels not in (1, 3):
        raise ConfigError(f"model.in_channels: must be 1 (grey) or 3 (RGB), got {model.in_channels}")
    if model.out_ch != model.in_channels:
        raise ConfigError(f"model.out_ch: must equal model.in_channels ({model.in_channels}), got {model.out_ch}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when path is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (see configs/ for the shipped ones)")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where}") from None
        if data is None:
            raise ConfigError(f"config file {path} is empty (start from one in configs/)")
    for item in overrides:
        _set_override(data, item)
    _drop_retired(data)
    return validate(build_section(Config, data))


def config_to_dict(cfg: Config) -> dict:
    """The plain mapping of a config (tuples as lists), as written to YAML with each run."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (temp name, then rename)."""
    atomic_write(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
