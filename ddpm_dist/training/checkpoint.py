"""Training checkpoint folders: named by step, written durably, published atomically, verified,
rotated, checked.

Layout: `<out_dir>/checkpoints/step_00005000/` holds the engine's state as the engine writes it
(`Engine.save`: DCP shards for single/ddp/fsdp, which load on any world size; DeepSpeed's own
format under `deepspeed/`), one `rank<r>.json` per rank (the data-stream position), the run's
`config.yaml` and, written last, `manifest.json` (every other file's relative path, size and sha256).
Every rank writes into `step_N.partial/` and fsyncs what it wrote; after a barrier rank 0 writes
the manifest and renames the folder to `step_N/`. A rename is atomic, so a checkpoint folder
either is complete or does not exist: a run killed mid-write leaves a `.partial` folder that
resume ignores. Resume takes the newest checkpoint whose files match its manifest (sizes and
hashes, no unlisted file) and falls back to older ones with a warning; nothing in a folder is
unpickled before it matches. Under a process group the ranks check together: rank 0 reads the
manifest and lists the folder, each rank hashes its share of the files, every rank gets the
verdict. A DCP folder without hashes (an older ddpm-dist) is loaded through
the restricted unpickler with a warning; a DeepSpeed one is refused. A save that fails (disk
full, not writable) removes its `.partial` folder, keeps the older checkpoints and raises
`CheckpointSaveError` on every rank. Random state needs no
saving: every step seeds its own generators from (seed, step, rank), so it is a function of the
step.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist

from ddpm_dist.config import (RESUME_MAY_CHANGE, Config, ConfigError, config_to_dict, flat_settings,
                              load_config, save_config)
from ddpm_dist.distributed import any_flag, barrier, broadcast_from_main, first_rank_with, rank_split
from ddpm_dist.engine_registry import CHECKPOINT_FORMATS, engines_writing
from ddpm_dist.training.engines import Engine, checkpoint_format
from ddpm_dist.training.engines.dcp_files import UnsafeCheckpointError, root_cause
from ddpm_dist.utils.download import file_sha256
from ddpm_dist.utils.files import atomic_write, fsync_dir
from ddpm_dist.utils.logs import log

_STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"  # DCP's index, in every single/ddp/fsdp checkpoint folder


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which one and what to do."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written; its partial folder is gone, older checkpoints are kept."""


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
    return sorted(found, key=step_of)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(checkpoint: Path) -> int:
    """The training step of a `step_N` checkpoint folder."""
    return int(_STEP_DIR.match(checkpoint.name).group(1))


def save_checkpoint(ckpt_dir: str | Path, step: int, engine: Engine, extra: dict, keep_last: int, cfg: Config,
                    name: str | None = None) -> Path:
    """Collective: every rank calls it. `extra` is this rank's JSON-able state (data position);
    the run's config is stored beside the weights so the checkpoint describes itself. `name`
    (default `step_N`) other than `step_N` gives a folder that resume and rotation ignore."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / (name or step_name(step))
    partial = final.with_name(final.name + ".partial")
    # Each _agree is an all-reduce, so it is also the barrier between the phases.
    _agree(_attempt(_prepare, ckpt_dir, partial) if _rank() == 0 else None, final, partial)
    _agree(_attempt(_write_parts, partial, step, engine, extra, cfg), final, partial)
    _agree(_attempt(_publish, partial, final, step) if _rank() == 0 else None, final, partial)
    if _rank() == 0:
        if _STEP_DIR.match(final.name):
            for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        log.info(f"saved checkpoint {final}")
    barrier()
    return final


def _prepare(ckpt_dir: Path, partial: Path) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while writing


def _write_parts(partial: Path, step: int, engine: Engine, extra: dict, cfg: Config) -> None:
    """This rank's files, each fsynced (DCP's writer, atomic_write, DeepSpeedEngine.save)."""
    engine.save(partial)
    _write_json(partial / f"rank{_rank()}.json", {"step": step, "world_size": _world_size(), **extra})
    if _rank() == 0:
        save_config(cfg, partial / "config.yaml")


def _publish(partial: Path, final: Path, step: int) -> None:
    """Rank 0, after every rank wrote its part: manifest last, then the rename."""
    for folder in (partial, *(p for p in partial.rglob("*") if p.is_dir())):
        fsync_dir(folder)  # the entries of files written without atomic_write (DCP, DeepSpeed)
    _write_json(partial / MANIFEST, {"step": step, **_file_records(partial)})
    if final.exists():  # the same step saved again (a stop request right after a save)
        shutil.rmtree(final)
    os.replace(partial, final)
    fsync_dir(final.parent)


def _attempt(fn, *args) -> BaseException | None:
    """Run a save phase; return the error it raised. Not only OSError: on a full disk torch.save
    inside DCP fails with a RuntimeError from its zip writer."""
    try:
        fn(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        return e
    return None


def _agree(error: BaseException | None, final: Path, partial: Path) -> None:
    """Collective: when any rank's save phase failed, every rank raises CheckpointSaveError after
    rank 0 removed the partial folder."""
    if not any_flag(error is not None):
        return
    if _rank() == 0:
        _remove(partial)
    barrier()
    reason = _first_line(error) if error is not None else "another rank could not write its part"
    raise CheckpointSaveError(f"could not save checkpoint {final}: {reason} ({_free_space(final.parent)}); "
                              f"the older checkpoints in {final.parent} are kept")


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2 ** 20:.0f} MiB free there"
    except OSError as e:
        return f"free space unknown: {e.strerror}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


# --- integrity: every file's sha256 recorded at save, checked before anything is unpickled ---

def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint folder cannot be trusted, or None: a file of its manifest missing, of
    another size or content than its sha256, or a file the manifest does not list. A DCP folder
    without a manifest or without hashes (an older ddpm-dist) passes unverified: its loader admits
    no code (see `dcp_files`). A DeepSpeed folder must have them: DeepSpeed unpickles anything.
    This process checks every file; `shared_checkpoint_problem` is the collective form."""
    verdict = _manifest_verdict(Path(path))
    if "sha256" not in verdict:
        return verdict.get("problem")
    return _hash_problem(Path(path), verdict["sha256"])


def shared_checkpoint_problem(path: str | Path) -> str | None:
    """Collective `checkpoint_problem`, the same answer on every rank: rank 0 reads the manifest
    and lists the folder (a planted, missing or resized file), then each rank hashes its share
    of the files (largest first, dealt round the ranks) and the first problem found is sent to
    all. So each file is hashed once per check, not once per rank."""
    if _world_size() == 1:
        return checkpoint_problem(path)
    path = Path(path)
    verdict = broadcast_from_main(_manifest_verdict(path) if _rank() == 0 else None)
    if "sha256" not in verdict:
        return verdict.get("problem")
    sizes, hashes = verdict["files"], verdict["sha256"]
    mine = rank_split(sorted(hashes, key=lambda name: (-sizes[name], name)), _rank(), _world_size())
    problem = _hash_problem(path, {name: hashes[name] for name in mine})
    first = first_rank_with(problem is not None)
    return None if first is None else broadcast_from_main(problem, src=first)


def _manifest_verdict(path: Path) -> dict:
    """What the manifest and the folder's listing say: {"problem": why} when they already refuse
    it, {} for an older unhashed DCP folder (accepted), else the files' sizes and hashes to check."""
    if not (path / MANIFEST).is_file():
        problem = _unhashed_problem(path, f"no {MANIFEST}")
        return {} if problem is None else {"problem": problem}
    try:
        manifest = _read_json(path / MANIFEST)
        files, hashes = manifest["files"], manifest.get("sha256")
        problem = _listing_problem(path, files)
    except (CheckpointError, KeyError, TypeError, AttributeError) as e:
        return {"problem": f"unreadable {MANIFEST} ({e})"}
    if problem is None and hashes is None:
        problem = _unhashed_problem(path, f"no sha256 in its {MANIFEST}")
        return {} if problem is None else {"problem": problem}
    if problem is not None:
        return {"problem": problem}
    return {"files": files, "sha256": {name: hashes.get(name) for name in files}}


def _file_records(folder: Path) -> dict:
    """The manifest's file lists: relative path → size, and relative path → sha256."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
    names = [p.relative_to(folder).as_posix() for p in files]
    return {"files": {n: p.stat().st_size for n, p in zip(names, files)},
            "sha256": {n: file_sha256(p) for n, p in zip(names, files)}}


def _listing_problem(path: Path, files: dict) -> str | None:
    """A listed file that is missing, of another size or outside the folder; an unlisted file."""
    for name, size in files.items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{MANIFEST} names {name!r}, outside the checkpoint folder"
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
    for file in sorted(path.rglob("*")):
        name = file.relative_to(path).as_posix()
        if file.is_symlink():
            return f"{name} is a symbolic link; a checkpoint holds only the files it wrote"
        if not file.is_dir() and name != MANIFEST and name not in files:
            return f"{name} is not listed in {MANIFEST} (added after the save); remove it or pick another checkpoint"
    return None


def _hash_problem(path: Path, hashes: dict) -> str | None:
    """The first file whose content differs from the sha256 recorded at save time. Files seen
    unchanged (same sizes and mtimes) since they verified in this process are not read again, so
    a resume that picks a checkpoint and then loads it hashes it once."""
    try:
        fingerprint = _fingerprint(path, hashes)
        if _VERIFIED.get(path.resolve()) == fingerprint:
            return None
        for name in hashes:
            if hashes[name] != file_sha256(path / name):
                return f"{name} does not match its sha256 in {MANIFEST} (altered or damaged since the save)"
    except OSError as e:  # gone since rank 0 listed it: an answer, so that no rank waits for this one
        return f"cannot read {Path(e.filename or path).name}: {e.strerror}"
    _VERIFIED[path.resolve()] = fingerprint
    return None


_VERIFIED: dict[Path, tuple] = {}


def _fingerprint(path: Path, files: dict) -> tuple:
    stats = [(path / name).stat() for name in files]
    return tuple((name, s.st_size, s.st_mtime_ns, s.st_ino) for name, s in zip(files, stats))


def _unhashed_problem(path: Path, missing: str) -> str | None:
    """Checkpoints written before manifests recorded hashes: DCP ones load (restricted unpickler,
    weights_only, storage paths confined to the folder); DeepSpeed ones are refused."""
    if checkpoint_format(path) != "deepspeed":
        return None
    return (f"{missing} (written by an older ddpm-dist), and DeepSpeed's loader runs code from its files: "
            f"only a checkpoint whose hashes match is loaded; resume from a newer checkpoint or a new out_dir")


def resumable_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """Collective: the newest checkpoint that verifies; each newer one that does not is skipped
    with a warning. None when there is no checkpoint; CheckpointError when none verifies. Rank 0
    lists the folder, every rank hashes its share (`shared_checkpoint_problem`)."""
    ckpt_dir = Path(ckpt_dir)
    names = broadcast_from_main([p.name for p in complete_checkpoints(ckpt_dir)] if _rank() == 0 else None)
    problems = []
    for path in reversed([ckpt_dir / name for name in names]):
        problem = shared_checkpoint_problem(path)
        if problem is None:
            if _rank() == 0:
                _warn_if_unhashed(path)
            return path
        if _rank() == 0:
            log.warning(f"skipping checkpoint {path}: {problem}; trying the previous one")
        problems.append(f"{path.name}: {problem}")
    if names:
        raise CheckpointError(f"no checkpoint in {ckpt_dir} is complete ({'; '.join(problems)})")
    return None


def find_checkpoint(path: Path) -> Path:
    """A DCP checkpoint folder itself, or the newest complete one under a run or checkpoints
    folder; CheckpointError when there is none. Collective under a process group."""
    if (path / DCP_METADATA).is_file():
        return path
    for folder in (path / "checkpoints", path):
        found = resumable_checkpoint(folder)
        if found is not None:
            return found
    raise CheckpointError(f"{path}: no complete checkpoint (step_XXXXXXXX/ with {DCP_METADATA}) here")


def _warn_if_unhashed(path: Path) -> None:
    if not (path / MANIFEST).is_file() or "sha256" not in _read_json(path / MANIFEST):
        log.warning(f"{path} has no file hashes (written by an older ddpm-dist): loading it unverified, "
                    f"through the restricted DCP unpickler")


def checkpoint_config(path: str | Path) -> Config:
    """The config a checkpoint was written with."""
    try:
        return load_config(Path(path) / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _load_engine(path: Path, engine: Engine) -> None:
    written_by = checkpoint_format(path)
    if written_by != engine.checkpoint_format:
        engines = "engine=" + " or ".join(", ".join(engines_writing(written_by)).rsplit(", ", 1))
        raise CheckpointError(f"{path} was written in {written_by} format; resume it with {engines}")
    try:
        engine.load(path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException with per-rank traces
        raise CheckpointError(_load_error(path, written_by, e)) from None


def _load_error(path: Path, written_by: str, e: BaseException) -> str:
    if isinstance(root_cause(e), UnsafeCheckpointError):
        return str(root_cause(e))
    if isinstance(e, FileNotFoundError):  # a file the format needs is missing
        name = CHECKPOINT_FORMATS[written_by].label
        return f"{path} is not a complete {name} checkpoint ({e}); pick another from {path.parent}"
    return (f"{path} does not fit this model/optimizer ({_first_line(e)}); was it "
            f"written with another config? Compare with {path / 'config.yaml'}")


def _check_same_model(path: Path, cfg: Config) -> None:
    saved = config_to_dict(checkpoint_config(path))
    current = config_to_dict(cfg)
    for section in ("model", "diffusion"):
        for key, value in saved[section].items():
            if current[section][key] != value:
                raise CheckpointError(f"{path} was written with {section}.{key}={value}, this run has "
                                      f"{current[section][key]}: use the checkpoint's config or another out_dir")


def resume_config_changes(path: Path, cfg: Config) -> dict[str, list]:
    """Compare the whole config a checkpoint was written with against this run's. Model and
    diffusion settings must match; any other difference outside RESUME_MAY_CHANGE is refused
    unless train.allow_config_change, and then returned as {key: [saved, current]} (to record)."""
    _check_same_model(path, cfg)
    saved, current = flat_settings(checkpoint_config(path)), flat_settings(cfg)
    changed = {key: [saved[key], value] for key, value in current.items()
               if key not in RESUME_MAY_CHANGE and saved.get(key) != value}
    if changed and not cfg.train.allow_config_change:
        listed = ", ".join(f"{key} ({old} → {new})" for key, (old, new) in sorted(changed.items()))
        raise CheckpointError(f"{path} was written with other settings: {listed}; resume with the "
                              f"checkpoint's settings, use another out_dir, or set "
                              f"train.allow_config_change=true to continue with these (recorded in metrics.jsonl)")
    return changed


def load_checkpoint(path: str | Path, engine: Engine, cfg: Config | None = None) -> dict:
    """Collective: load engine state (resharding to this world size) and return this rank's extra
    state. With `cfg`, first check that the checkpoint holds the same model."""
    path = Path(path)
    problem = shared_checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path} is not a complete checkpoint: {problem}; pick another from {path.parent}")
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
    """The root cause's message."""
    e = root_cause(e)
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None

