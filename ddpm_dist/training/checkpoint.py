"""Training checkpoint folders: named by step, published atomically, rotated, checked.

Layout: `<out_dir>/checkpoints/step_00005000/` holds the engine's state as the engine writes it
(`Engine.save`: DCP shards for single/ddp/fsdp, which load on any world size; DeepSpeed's own
format under `deepspeed/`), one `rank<r>.json` per rank (the data-stream position) and the run's
`config.yaml`. Every rank writes into `step_N.partial/`; after a barrier rank 0 renames it to
`step_N/`. A rename is atomic, so a checkpoint folder either is complete or does not exist: a run
killed mid-write leaves a `.partial` folder that resume ignores. Random state needs no saving:
every step seeds its own generators from (seed, step, rank), so it is a function of the step.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist

from ddpm_dist.config import Config, ConfigError, config_to_dict, load_config, save_config
from ddpm_dist.distributed import barrier
from ddpm_dist.training.engines import Engine, checkpoint_format
from ddpm_dist.utils.files import atomic_write, fsync_dir
from ddpm_dist.utils.logs import log

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which one and what to do."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def save_checkpoint(ckpt_dir: str | Path, step: int, engine: Engine, extra: dict, keep_last: int, cfg: Config) -> Path:
    """Collective: every rank calls it. `extra` is this rank's JSON-able state (data position);
    the run's config is stored beside the weights so the checkpoint describes itself."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:08d}"
    partial = ckpt_dir / f"step_{step:08d}.partial"
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while writing
    barrier()
    engine.save(partial)
    _write_json(partial / f"rank{_rank()}.json", {"step": step, "world_size": _world_size(), **extra})
    if _rank() == 0:
        save_config(cfg, partial / "config.yaml")
    barrier()
    if _rank() == 0:
        if final.exists():  # the same step saved again (a stop request right after a save)
            shutil.rmtree(final)
        os.replace(partial, final)
        fsync_dir(ckpt_dir)
        for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info(f"saved checkpoint {final}")
    barrier()
    return final


def checkpoint_config(path: str | Path) -> Config:
    """The config a checkpoint was written with."""
    try:
        return load_config(Path(path) / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _load_engine(path: Path, engine: Engine) -> None:
    written_by = checkpoint_format(path)
    if written_by != engine.checkpoint_format:
        engines = "engine=deepspeed" if written_by == "deepspeed" else "engine=single, ddp or fsdp"
        raise CheckpointError(f"{path} was written in {written_by} format; resume it with {engines}")
    try:
        engine.load(path)
    except FileNotFoundError as e:  # a file the format needs is missing
        name = {"dcp": "DCP", "deepspeed": "DeepSpeed"}[written_by]
        raise CheckpointError(f"{path} is not a complete {name} checkpoint ({e}); "
                              f"pick another from {path.parent}") from None
    except BaseException as e:  # DCP's CheckpointException is a BaseException with per-rank traces
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"{path} does not fit this model/optimizer ({_first_line(e)}); was it "
                              f"written with another config? Compare with {path / 'config.yaml'}") from None


def _check_same_model(path: Path, cfg: Config) -> None:
    saved = config_to_dict(checkpoint_config(path))
    current = config_to_dict(cfg)
    for section in ("model", "diffusion"):
        for key, value in saved[section].items():
            if current[section][key] != value:
                raise CheckpointError(f"{path} was written with {section}.{key}={value}, this run has "
                                      f"{current[section][key]}: use the checkpoint's config or another out_dir")


def load_checkpoint(path: str | Path, engine: Engine, cfg: Config | None = None) -> dict:
    """Load engine state (resharding to this world size) and return this rank's extra state.
    With `cfg`, first check that the checkpoint holds the same model."""
    path = Path(path)
    if cfg is not None:
        _check_same_model(path, cfg)
    _load_engine(path, engine)
    own = path / f"rank{_rank()}.json"
    extra = _read_json(own if own.is_file() else path / "rank0.json")
    if extra.get("world_size") != _world_size():
        log.warning(f"resuming a {extra.get('world_size')}-rank checkpoint on {_world_size()} ranks: "
                    f"weights and optimizer are resharded; the data order continues from rank 0's position")
    return extra


def _first_line(e: BaseException) -> str:
    """The root cause's message: DCP wraps each rank's exception in a CheckpointException."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))
        e = e[0] if isinstance(e, tuple) else e  # (exception, traceback) per rank
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None

