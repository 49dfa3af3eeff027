"""Typed run configuration: dataclasses, YAML loading, `key.sub=value` overrides, validation.

A config is data: `load_config(path, overrides)` gives a `Config`; `config_to_dict` gives the
plain mapping that is saved next to every run, so a run can be reproduced from its folder.
Every error is a `ConfigError` with one line naming the bad key and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ddpm_dist.engine_registry import ENGINES
from ddpm_dist.utils.files import atomic_write
from ddpm_dist.utils.urls import control_character_error, endpoint_error, location_error


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
    # A global batch other than the one lr and warmup_steps were set for: "linear" multiplies
    # lr by train.batch_size / reference_batch, "sqrt" by its square root; either keeps the
    # warm-up at the same number of images (warmup_steps x reference_batch / batch_size).
    # "none" trains with lr and warmup_steps as they are (the paper's configs).
    scale_rule: str = "none"
    reference_batch: int | None = None  # needed by linear and sqrt

    def effective(self, batch_size: int) -> tuple[float, int]:
        """(lr, warm-up steps) the run trains with at global batch `batch_size`."""
        if self.scale_rule == "none":
            return self.lr, self.warmup_steps
        ratio = batch_size / self.reference_batch
        lr = self.lr * (ratio if self.scale_rule == "linear" else math.sqrt(ratio))
        warmup = max(1, round(self.warmup_steps / ratio)) if self.warmup_steps else 0
        return lr, warmup


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
    # engine=fsdp only: the ranks each shard group spans; the groups replicate each other
    # (hybrid sharding: all-gathers stay within a node, one gradient all-reduce crosses nodes).
    # None: the ranks of one node (LOCAL_WORLD_SIZE, SLURM_NTASKS_PER_NODE); 0: all ranks.
    fsdp_shard_size: int | None = None
    log_every: int = 100
    sample_every: int = 10_000
    num_samples: int = 64
    # Respaced ancestral steps for the sample grids before the last step (0, or T and more: all
    # T). A cheap setting shows the samples emerge during a run at a fraction of the cost; the
    # last step's grid always runs the full chain.
    sample_steps: int = 0
    ckpt_every: int = 5_000
    # Also save when this many minutes have passed since the last checkpoint (0: off), checked
    # every 10 steps by rank 0's clock: at thousands of images per step a step count is minutes
    # on one cluster and hours on another.
    ckpt_every_minutes: float = 0.0
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
    # Resume from a checkpoint written with other optimizer, data, seed or training settings
    # (RESUME_MAY_CHANGE lists those that may change anyway); the change is recorded in
    # metrics.jsonl. Model and diffusion settings can never change: the weights would not fit.
    allow_config_change: bool = False


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


# Settings that may differ between a checkpoint's config and the run resuming it: where and how
# the run executes, how long it runs, what it reports, and how it reads its data. Every other
# setting changes the training itself and needs train.allow_config_change=true.
RESUME_MAY_CHANGE = (
    "out_dir", "device", "engine", "train.total_steps", "train.log_every", "train.sample_every",
    "train.num_samples", "train.ckpt_every", "train.keep_last", "train.collective_timeout", "train.hang_timeout",
    "train.compile", "train.compile_mode", "train.activation_checkpointing", "train.micro_batch_size",
    "train.zero_stage", "train.fsdp_shard_size", "train.allow_config_change", "data.num_workers", "data.retries",
    "data.retry_wait", "data.s3_endpoint", "data.max_skip_fraction",
)


def flat_settings(cfg: Config) -> dict:
    """{"section.key": value} of every setting (top-level ones without a section)."""
    flat = {}
    for name, value in config_to_dict(cfg).items():
        if isinstance(value, dict):
            flat.update({f"{name}.{key}": v for key, v in value.items()})
        else:
            flat[name] = value
    return flat


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
    "optim.scale_rule": ("none", "linear", "sqrt"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "engine": tuple(ENGINES),
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


# The allowed values of every numeric setting, by rule; a value outside is refused with
# "<key>: must be <rule>, got <value>". Every numeric field has an entry (tests walk them all
# with nan, inf, negative and zero values). Zeros that are allowed mean: data.num_workers no
# loader processes, data.retries no retry, data.retry_wait retry at once,
# data.max_skip_fraction no skipped sample tolerated, model.dropout none, optim.beta1/beta2 no
# averaging, optim.warmup_steps no warm-up, train.ema_decay EMA = weights, train.zero_stage
# DeepSpeed without partitioning, train.fsdp_shard_size one shard group of all ranks,
# train.num_samples no sample grids, train.sample_steps all diffusion steps,
# train.ckpt_every_minutes no timed saves, train.hang_timeout no watchdog.
_RULES = {
    "positive": lambda v: v > 0,
    "0 or more": lambda v: v >= 0,
    "at least 1": lambda v: v >= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "0, 1, 2 or 3": lambda v: v in (0, 1, 2, 3),
    "0 or more and below 2^63": lambda v: 0 <= v < 2 ** 63,  # torch.manual_seed's range
}
RANGES = {
    "model.ch": "positive", "model.out_ch": "positive", "model.ch_mult": "positive",
    "model.num_res_blocks": "positive", "model.attn_resolutions": "positive", "model.dropout": "in [0, 1)",
    "model.in_channels": "positive", "model.resolution": "positive",
    "diffusion.num_timesteps": "positive",
    "data.num_workers": "0 or more", "data.retries": "0 or more", "data.retry_wait": "0 or more",
    "data.max_skip_fraction": "in [0, 1)",
    "optim.lr": "positive", "optim.beta1": "in [0, 1)", "optim.beta2": "in [0, 1)", "optim.eps": "positive",
    "optim.warmup_steps": "0 or more", "optim.reference_batch": "positive",
    # the global gradient norm is clipped to it: 0 would zero every update, a negative value
    # turns the step around (gradient ascent)
    "optim.grad_clip": "positive",
    "train.batch_size": "positive", "train.micro_batch_size": "positive", "train.total_steps": "positive",
    "train.ema_decay": "in [0, 1)", "train.zero_stage": "0, 1, 2 or 3",
    "train.fsdp_shard_size": "0 or more", "train.log_every": "positive",
    "train.sample_every": "positive", "train.num_samples": "0 or more", "train.sample_steps": "0 or more",
    "train.ckpt_every": "positive", "train.ckpt_every_minutes": "0 or more",
    "train.keep_last": "at least 1", "train.collective_timeout": "positive",
    "train.step_timeout": "positive", "train.hang_timeout": "0 or more",
    "seed": "0 or more and below 2^63",
}


def _numeric_values(cfg: Config):
    """(key, value) for every number in the config; tuple settings give each element."""
    flat = config_to_dict(cfg)
    for key in RANGES:
        section, _, name = key.rpartition(".")
        value = flat[section][name] if section else flat[name]
        for item in value if isinstance(value, list) else [value]:
            if item is not None:  # None: derived (micro-batch, shard size) or unused (reference batch)
                yield key, item


def _check_ranges(cfg: Config) -> None:
    for key, value in _numeric_values(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        rule = RANGES[key]
        if not _RULES[rule](value):
            extra = " (the number of newest checkpoints kept)" if key == "train.keep_last" else ""
            raise ConfigError(f"{key}: must be {rule}, got {value}{extra}")
    o, t = cfg.optim, cfg.train
    if o.scale_rule != "none" and o.reference_batch is None:
        raise ConfigError(f"optim.scale_rule={o.scale_rule} needs optim.reference_batch: the global batch optim.lr "
                          f"and optim.warmup_steps were set for (the paper's: 128 for CIFAR-10, 64 at 256²)")
    if t.sample_steps == 1:  # one respaced step would jump from x_T straight to x_0
        raise ConfigError("train.sample_steps: must be 0 (all steps) or at least 2, got 1")
    if t.micro_batch_size is not None and t.batch_size % t.micro_batch_size:
        # every world size W needs batch_size % (micro_batch_size * W) == 0 (checked at start)
        raise ConfigError(f"train.micro_batch_size: {t.micro_batch_size} does not divide "
                          f"train.batch_size={t.batch_size}")


def _check_urls(cfg: Config) -> None:
    """URLs are saved with the run and show in errors: no credentials inside them; only the
    schemes the data layer honours with all of its settings; no control characters anywhere."""
    message = location_error(cfg.data.source, "data.source") or \
        endpoint_error(cfg.data.s3_endpoint, "data.s3_endpoint") or _control_characters(config_to_dict(cfg))
    if message:
        raise ConfigError(message)


def _control_characters(data, key: str = "") -> str | None:
    """The first string setting holding a control character (it would reach file names and
    job scripts), as one line."""
    if isinstance(data, dict):
        return next(filter(None, (_control_characters(v, f"{key}{k}.") for k, v in data.items())), None)
    if isinstance(data, (list, tuple)):
        return next(filter(None, (_control_characters(v, key) for v in data)), None)
    return control_character_error(data, key.rstrip(".")) if isinstance(data, str) else None


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


def validate(cfg: Config) -> Config:
    _check_urls(cfg)  # first: no later message may quote a URL with credentials
    _check_choices(cfg)
    _check_ranges(cfg)
    _check_model(cfg)
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
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model:, train:, ...) at the top level, "
                              f"got a {type(data).__name__}")
    for item in overrides:
        _set_override(data, item)
    return config_from_dict(data)


def config_from_dict(data: dict) -> Config:
    """A validated Config from the plain mapping of `config_to_dict` (or a YAML file's)."""
    data = copy.deepcopy(data)
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
    """Write the resolved config atomically (temp name, then rename); a scaled recipe's first
    line (a comment) says the learning rate and warm-up the run trains with."""
    atomic_write(path, scaled_recipe_line(cfg, "# ") + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def scaled_recipe_line(cfg: Config, prefix: str = "") -> str:
    """One line (with its newline) naming the lr and warm-up that optim.scale_rule gives, or ""."""
    o, batch = cfg.optim, cfg.train.batch_size
    if o.scale_rule == "none":
        return ""
    lr, warmup = o.effective(batch)
    return (f"{prefix}this run uses optim.lr {lr:.6g} and optim.warmup_steps {warmup}: optim.scale_rule={o.scale_rule} "
            f"from optim.reference_batch {o.reference_batch} to train.batch_size {batch}\n")
