"""Distributed sample generation for FID: per-sample noise streams, strided slices, atomic writes.

Sample i comes from the noise stream keyed by (seed, i) (`noise.SampleNoise`), so the
images do not depend on the world size, the batch size or which samples a rerun skips. Each
is written atomically as `DIR/{i - i % 1000:06d}/{i:06d}.png`; a rerun keeps the finished
ones and splits only the missing indices over the ranks (strided, so work stays even). Each
rank checks only its own share of the PNGs and the ranks sum their findings, so a rank makes
N/W file checks, not N. A PNG that does not decode to the sample shape is deleted and sampled
again. `DIR/manifest.json` (weights hash, sampler, steps, eta, bf16, seed) is written before the
first PNG: a rerun with other settings is refused instead of mixing two models' samples. It also
records whether the runs that wrote into the folder were compiled (`compiled`: the settings seen),
without comparing it: compiled and eager samples differ in rounding only, and folders from before
the record resume. At the end all ranks write the ADM-style `samples_{N}x{H}x{W}x3.npz` (`arr_0`,
uint8 NHWC, index order) together, each its own block of rows (`npz_merge`).
Optionally each rank streams Inception statistics of its samples (`InceptionStatistics`); the
float64 sums are all-reduced (nothing is gathered) and rank 0 writes FID / IS to the result JSON.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from ddpm_dist.distributed import DistInfo, all_reduce_sum, barrier, rank_block, rank_split
from ddpm_dist.evaluation import npz_merge
from ddpm_dist.images import save_png, to_uint8
from ddpm_dist.metrics.evaluate import InceptionStatistics
from ddpm_dist.noise import NOISE, SampleNoise
from ddpm_dist.samplers import Sampler
from ddpm_dist.utils.files import atomic_write, fsync_dir, is_temp_file

MANIFEST = "manifest.json"


@dataclass
class SampleJob:
    """What to sample; everything a result needs to be reproduced."""
    out: str
    num_samples: int
    seed: int = 0
    batch_size: int = 64
    sampler: str = "ddpm"
    steps: int | None = None
    eta: float = 0.0
    bf16: bool = False
    weights_sha256: str = ""
    overwrite: bool = False  # clear the folder's samples first, whatever made them

    def manifest(self) -> dict:
        """What determines the images (num_samples does not: a larger N extends a run)."""
        return {"weights_sha256": self.weights_sha256, "sampler": self.sampler, "steps": self.steps,
                "eta": self.eta if self.sampler == "ddim" else None, "bf16": self.bf16, "seed": self.seed,
                "noise": NOISE}


def sample_path(out: str | Path, i: int) -> Path:
    """`{i:06d}.png` in a subfolder per 1000 samples, so no folder holds 50k files."""
    return Path(out) / f"{i - i % 1000:06d}" / f"{i:06d}.png"


def npz_path(out: str | Path, n: int, h: int, w: int) -> Path:
    return Path(out) / f"samples_{n}x{h}x{w}x3.npz"


def missing_indices(out: str | Path, n: int) -> list[int]:
    """Indices without a finished PNG (a PNG exists only once complete: written by rename)."""
    return [i for i in range(n) if not sample_path(out, i).is_file()]


def manifest_mismatch(out: str | Path, job: SampleJob) -> str | None:
    """Why the samples in `out` are not `job`'s, or None when they are (or there are none)."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        has_samples = any(Path(out).glob("[0-9]" * 6 + "/*.png"))
        return f"{out} holds samples without a {MANIFEST}" if has_samples else None
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"{path} is unreadable"
    for key, value in job.manifest().items():
        if old.get(key) != value:
            return f"{out} holds samples made with {key}={old.get(key)!r}, this run has {key}={value!r}"
    return None


def check_output(out: str | Path, job: SampleJob) -> None:
    """Raise one line when `out` holds another run's samples and --overwrite is not given."""
    why = None if job.overwrite else manifest_mismatch(out, job)
    if why:
        raise ValueError(f"{why}; use another --out or --overwrite (deletes its samples)")


_SAMPLE_FOLDER = re.compile(r"^\d{6}$")
_OWN_FILES = re.compile(r"^(samples_\d+x\d+x\d+x3\.npz|result\.json|inception_stats\.npz|manifest\.json)$")


def clear_samples(out: str | Path) -> None:
    """Delete what sampling writes into `out`, by its exact names (sample PNGs in their
    thousands folders, the npz, JSON and statistics); every other file stays, even in a
    six-digit folder."""
    for entry in Path(out).iterdir():
        if entry.is_dir() and not entry.is_symlink() and _SAMPLE_FOLDER.match(entry.name):
            _clear_sample_folder(entry)
        elif entry.is_file() and not entry.is_symlink() and _OWN_FILES.match(entry.name):
            entry.unlink()


def _clear_sample_folder(folder: Path) -> None:
    """The PNGs `sample_path` puts in this folder and our temp files; then the folder if empty."""
    first = int(folder.name)
    for entry in folder.iterdir():
        index = entry.name[:-4] if entry.name.endswith(".png") else ""
        own = index.isdigit() and len(index) == 6 and first <= int(index) < first + 1000 and first % 1000 == 0
        if entry.is_file() and not entry.is_symlink() and (own or is_temp_file(entry)):
            entry.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


def prepare_output(job: SampleJob, compiled: bool) -> None:
    """Rank 0, before any PNG, after every rank's `check_output`: clear the folder if asked,
    write the manifest, with `compiled` added to the settings its earlier runs recorded."""
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    if job.overwrite:
        clear_samples(out)
    remove_partial_files(out)
    earlier = json.loads((out / MANIFEST).read_text()).get("compiled", []) if (out / MANIFEST).is_file() else []
    record = {**job.manifest(), "compiled": sorted({*earlier, compiled})}
    atomic_write(out / MANIFEST, json.dumps(record, indent=2) + "\n")


def is_sample(path: Path, shape: tuple[int, int]) -> bool:
    """True when `path` decodes completely to an image of (height, width) `shape`. The header is
    read first: a file claiming another size is not decoded (a small PNG can claim 9500² pixels)."""
    try:
        with Image.open(path) as image:
            if image.size != (shape[1], shape[0]):
                return False
        return tuple(load_png(path).shape[1:]) == shape
    except (OSError, ValueError, SyntaxError):  # PIL's errors for empty, truncated, garbled files
        return False


def own_missing(out: str | Path, indices, shape: tuple[int, int]) -> list[int]:
    """Those of `indices` (one rank's share) without a finished sample of (height, width) `shape`;
    a PNG that exists but is not one is deleted."""
    missing = []
    for i in indices:
        path = sample_path(out, i)
        if path.is_file() and is_sample(path, shape):
            continue
        path.unlink(missing_ok=True)
        missing.append(i)
    return missing


def missing_everywhere(out: str | Path, n: int, shape: tuple[int, int], info: DistInfo) -> list[int]:
    """Collective: every index below `n` without a finished sample, the same list on every rank.
    Each rank checks its own share and the ranks sum one flag per index: N/W checks per rank."""
    flags = torch.zeros(n, dtype=torch.uint8, device=info.device)
    flags[own_missing(out, rank_split(range(n), info.rank, info.world_size), shape)] = 1
    all_reduce_sum([flags])
    return flags.nonzero().flatten().tolist()


def parts_path(npz: Path) -> Path:
    """The npz while the ranks fill it: one name for all of them, unlike `atomic_path`'s."""
    return npz.with_name(f".{npz.name}.parts")


def remove_partial_files(out: str | Path) -> None:
    """Temp files of a killed run (`.000123.png.tmp<pid>-<random>`, an unfinished npz); no
    writer is running now."""
    for tmp in Path(out).glob("*/.*.png.tmp*"):
        if is_temp_file(tmp):
            tmp.unlink(missing_ok=True)
    for parts in Path(out).glob(".samples_*.npz.parts"):
        parts.unlink(missing_ok=True)


def load_png(path: Path) -> torch.Tensor:
    """uint8 [3, H, W] of a sample PNG (grey samples become RGB, as the npz stores them)."""
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] → [B, 3, H, W]: one-channel models give grey RGB."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def generate_batch(sampler: Sampler, indices: list[int], seed: int, batch: int, device) -> torch.Tensor:
    """uint8 [B, C, H, W] samples of `indices`. A short last batch is padded to `batch` rows, so
    all model calls of a rank have one shape (no kernel re-selection or recompile for it); the
    pad rows repeat the last sample and are dropped."""
    padded = indices + indices[-1:] * (batch - len(indices))
    return to_uint8(sampler(SampleNoise(seed, padded, device), device)[:len(indices)]).cpu()


AUTO_BATCH_LIMIT = 1024   # the largest batch `--batch-size auto` picks
AUTO_MEMORY_SHARE = 0.8   # of the free GPU memory one sampling step may take
CPU_BATCH = 64            # `--batch-size auto` on a CPU


def largest_power_of_two(fits: Callable[[int], bool], limit: int) -> int:
    """The largest power of two b ≤ limit with fits(b), trying 2, 4, 8, … until one does not
    fit (memory grows with b); 1 if even 2 does not fit."""
    b = 1
    while 2 * b <= limit and fits(2 * b):
        b *= 2
    return b


def step_peak_bytes(sampler: Sampler, batch: int, device: torch.device) -> float:
    """CUDA memory one sampling step at `batch` adds at its peak (x_t, a forward, the step's
    noise); infinite if it runs out of memory. The forward is the eager network, in the dtype
    and layout of sampling, not the compiled one, which would compile once per probed size
    (and whose fused kernels usually keep fewer intermediates alive)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    try:
        with torch.no_grad():
            noise = SampleNoise(0, range(batch), device)
            x = noise.draw((batch, *sampler.image_shape))
            out = sampler.network(x, torch.zeros(batch, dtype=torch.long, device=device))
            noise.draw(out.shape)
        return torch.cuda.max_memory_allocated(device) - base
    except torch.cuda.OutOfMemoryError:
        return math.inf
    finally:
        torch.cuda.empty_cache()


def auto_batch_size(sampler: Sampler, device: torch.device) -> int:
    """The largest power of two ≤ 1024 whose sampling step fits in 80% of the free GPU memory
    (measured before probing); 64 on a CPU. Ranks may pick different sizes: samples do not
    depend on it."""
    if device.type != "cuda":
        return CPU_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    return largest_power_of_two(lambda b: step_peak_bytes(sampler, b, device) <= AUTO_MEMORY_SHARE * free,
                                AUTO_BATCH_LIMIT)


def write_samples(out: str | Path, indices: list[int], images: torch.Tensor) -> None:
    for i, image in zip(indices, images):
        save_png(image, sample_path(out, i))  # its atomic write creates the thousands folder


def _npz_row(out: str | Path, i: int, h: int, w: int) -> bytes:
    image = load_png(sample_path(out, i))
    if image.shape != (3, h, w):
        raise ValueError(f"{sample_path(out, i)}: {tuple(image.shape)}, expected {(3, h, w)}")
    return image.permute(1, 2, 0).contiguous().numpy().tobytes()


def _all_gather_ints(values: list[int], device) -> list[list[int]]:
    """Every rank's `values` (int64), in rank order; [values] outside a process group."""
    if not dist.is_initialized():
        return [values]
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [t.tolist() for t in every]


def merge_npz(out: str | Path, n: int, info: DistInfo | None = None) -> Path | None:
    """Collective when `info` is given: all N samples in index order as `arr_0` uint8 NHWC, the
    file np.savez writes. Each rank reads its contiguous block of N/W PNGs and writes it in place
    (memory: one image), into a file that is renamed to the npz once every rank has written;
    rank 0 returns its path. If any rank fails, no npz is left and every rank raises."""
    rank, world, device = (info.rank, info.world_size, info.device) if info else (0, 1, "cpu")
    barrier()  # every PNG is written
    _, h, w = load_png(sample_path(out, 0)).shape
    layout = npz_merge.NpzLayout(n, h, w)
    path = npz_path(out, n, h, w)
    parts = parts_path(path)
    if rank == 0:
        npz_merge.create(parts, layout)
    barrier()
    error, crc, length = None, 0, 0
    try:
        crc, length = npz_merge.write_rows(parts, layout, rank_block(n, rank, world), lambda i: _npz_row(out, i, h, w))
    except (OSError, ValueError) as e:
        error = e
    blocks = _all_gather_ints([crc, length, error is not None], device)
    if any(failed for _, _, failed in blocks):
        if rank == 0:
            parts.unlink(missing_ok=True)
        raise error or RuntimeError(f"another rank could not read its samples into {path.name}")
    if rank != 0:
        return None
    npz_merge.finish(parts, layout, [(c, size) for c, size, _ in blocks])
    os.replace(parts, path)
    fsync_dir(path.parent)
    return path


def _batches(items: list[int], size: int):
    for k in range(0, len(items), size):
        yield items[k:k + size]


def _score(score: InceptionStatistics, indices: list[int], images: torch.Tensor) -> None:
    """uint8 samples, exactly as saved: the score is that of the PNGs."""
    score.update(rgb(images).float() / 255, torch.tensor(indices))


def _score_finished(score: InceptionStatistics, job: SampleJob, indices: list[int]) -> None:
    """Samples a previous run finished count too: read back their PNGs."""
    for batch in _batches(indices, job.batch_size):
        _score(score, batch, torch.stack([load_png(sample_path(job.out, i)) for i in batch]))


def _progress(total: int, info: DistInfo, desc: str):
    """Rank 0's bar; ranks get equal shares, so rank 0 counts its batches × W: the bar shows
    the whole run's samples and samples/s without a collective per batch."""
    return tqdm(total=total, unit="sample", desc=desc, disable=not info.is_main, dynamic_ncols=True)


def generate(job: SampleJob, sampler: Sampler, info: DistInfo, score: InceptionStatistics | None = None) -> dict:
    """Collective: every rank calls it. Writes the missing PNGs of `job`, then (rank 0) the npz;
    returns timing, and the reduced statistics stay in `score`."""
    check_output(job.out, job)  # on every rank, so all of them stop on another run's folder
    if info.is_main:
        prepare_output(job, sampler.plan.compile)
    barrier()  # the folder is this job's before anyone checks a PNG
    todo = missing_everywhere(job.out, job.num_samples, tuple(sampler.image_shape[1:]), info)
    mine = rank_split(todo, info.rank, info.world_size)
    bar, start = _progress(len(todo), info, f"sampling seed {job.seed}"), time.perf_counter()
    rows = min(job.batch_size, len(mine))
    for batch in _batches(mine, job.batch_size):
        images = generate_batch(sampler, batch, job.seed, rows, info.device)
        write_samples(job.out, batch, images)
        if score is not None:
            _score(score, batch, images)
        bar.update(min(len(batch) * info.world_size, bar.total - bar.n))
    bar.close()
    seconds = time.perf_counter() - start
    if score is not None:
        done = sorted(set(range(job.num_samples)) - set(todo))
        _score_finished(score, job, rank_split(done, info.rank, info.world_size))
        score.all_reduce()
    npz = merge_npz(job.out, job.num_samples, info)
    return {"generated": len(todo), "seconds": seconds,
            "samples_per_s": len(todo) / seconds if todo and seconds > 0 else None,
            "npz": str(npz) if npz else None}
