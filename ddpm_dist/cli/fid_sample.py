"""Sample N images from a model on W ranks, optionally scoring FID / IS as they are made.

    python tools/fid_sample.py --config CFG --ckpt CKPT --num-samples N --out DIR --world-size W

Sample i is drawn from the noise stream keyed by (seed, i) (ddpm_dist/noise.py:
`SampleNoise`), so W = 1 and W = 64 write the same `DIR/{i//1000*1000:06d}/{i:06d}.png`;
a rerun skips finished samples and resamples broken PNGs. `DIR/manifest.json` records the
weights hash, sampler, steps, eta, bf16, seed and noise generator: a rerun into DIR with other
ones stops with one line unless --overwrite (which deletes DIR's samples first). The run ends
with `DIR/samples_{N}x{H}x{W}x3.npz`, `DIR/samples_grid.png` (the first 64 samples) and
`DIR/result.json` (N, seed, sampler, steps, weights hash; FID/IS and the Inception pipeline when
scoring, plus the samples' `inception_stats.npz`).
Scoring is on with --ref-stats, --inception-weights or --score. `--seeds 3` samples seeds S,
S+1, S+2 (disjoint: noise keys mix (seed, i)) into DIR/seed_<s>/ and reports FID mean ± sample
std (ddof=1). On a GPU the network runs channels_last and compiled once (--compile auto);
--bf16 runs it on a bf16 copy of the weights (ddpm_dist/samplers.py: `network_plan`).
Launch: inside torchrun/srun the ranks exist already; else `--launcher local` spawns W
processes here and `--launcher slurm` submits W tasks with submitit.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ddpm_dist import distributed
from ddpm_dist.config import CHOICES
from ddpm_dist.launch.ranks import add_launch_arguments
from ddpm_dist.launch.tool import RankedTool, run_tool
from ddpm_dist.utils.files import atomic_write
from ddpm_dist.modelio.source import add_model_arguments, load_for_evaluation
from ddpm_dist.evaluation.generate import SampleJob, auto_batch_size, check_output, generate
from ddpm_dist.evaluation.grid import GRID_FILE, write_samples_grid
from ddpm_dist.evaluation.shared_weights import load_inception_once, load_model_once
from ddpm_dist.metrics.evaluate import InceptionStatistics
from ddpm_dist.modelio.model_file import weights_sha256
from ddpm_dist.samplers import SAMPLERS, Sampler, respace
from ddpm_dist.utils.urls import control_character_error


def batch_size(text: str) -> int | str:
    """`auto` or a positive integer (argparse reports the error as an invalid batch_size value)."""
    if text == "auto":
        return text
    if int(text) < 1:
        raise ValueError(text)
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p)
    add_launch_arguments(p)
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="disjoint seed sets seed, seed+1, ...: FID mean ± std")
    p.add_argument("--steps", type=int, default=None, help="respaced steps K (default: all T)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η (0: deterministic)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--batch-size", type=batch_size, default="auto",
                   help="samples per model call per rank, or auto (the default): on a GPU the largest power of two ≤ 1024 "
                        "whose step fits in 80%% of free memory, on a CPU 64")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 network: on a GPU a bf16 copy of the weights, on a CPU bf16 autocast; x_t stays float32")
    p.add_argument("--compile", choices=CHOICES["train.compile"], default="auto",
                   help="torch.compile the network once (auto: on a GPU only)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the samples in --out first, even if other settings made them")
    p.add_argument("--score", action="store_true", help="Inception Score (and FID with --ref-stats)")
    p.add_argument("--inception-weights", metavar="FILE", help="pytorch-fid Inception state dict")
    p.add_argument("--ref-stats", metavar="NPZ", help="reference mu/sigma (tools/fid_stats.py)")
    args = p.parse_args(argv)
    if error := control_character_error(args.out, "--out"):
        p.error(error)  # a file name, and on Slurm a job script's line
    if args.num_samples < 1 or args.world_size < 1 or args.seeds < 1:
        p.error("--num-samples, --world-size and --seeds must be positive")
    args.score = bool(args.score or args.ref_stats or args.inception_weights)
    return args


def load_scoring(args, info):
    """Collective: (Inception, reference stats) before any sampling, so a missing file fails
    fast. Rank 0 alone reads (or downloads) the Inception weights and broadcasts them; the
    reference statistics are needed by rank 0 only."""
    from ddpm_dist.metrics.stats import load_stats
    ref, error = None, None
    if args.ref_stats and info.is_main:
        try:
            ref = load_stats(args.ref_stats)
        except ValueError as e:
            error = e
        if ref is None and error is None:
            error = FileNotFoundError(f"--ref-stats {args.ref_stats}: not an .npz with mu and sigma")
    if distributed.any_flag(error is not None):  # every rank stops, not only rank 0
        raise error or FileNotFoundError(f"--ref-stats {args.ref_stats}: rank 0 could not read it")
    return load_inception_once(args.inception_weights, info), ref


def summary(args, sha, runs: list[dict]) -> dict:
    """The result JSON: enough to say exactly what produced the number."""
    from ddpm_dist.metrics.inception import PIPELINE
    out = {"num_samples": args.num_samples, "seed": args.seed, "seeds": [r["seed"] for r in runs],
           "sampler": args.sampler, "steps": args.steps, "eta": args.eta if args.sampler == "ddim" else None,
           "bf16": args.bf16, "ckpt": args.ckpt if not args.random_init else "random-init",
           "weights_sha256": sha, "world_size": runs[0]["world_size"], "runs": runs}
    if args.score:
        out["pipeline"] = PIPELINE
        fids = [r["fid"] for r in runs if r.get("fid") is not None]
        out["fid"] = statistics.mean(fids) if fids else None
        out["fid_std"] = statistics.stdev(fids) if len(fids) > 1 else None  # sample std, ddof=1
        out["inception_score"] = statistics.mean(r["inception_score"] for r in runs)
    return out


def sample_jobs(args, sha: str, batch: int) -> list[SampleJob]:
    """One job per seed: DIR itself, or DIR/seed_<s>/ with --seeds > 1."""
    jobs = []
    for seed in range(args.seed, args.seed + args.seeds):
        out = Path(args.out) if args.seeds == 1 else Path(args.out) / f"seed_{seed}"
        jobs.append(SampleJob(str(out), args.num_samples, seed, batch, args.sampler, args.steps,
                              args.eta, args.bf16, weights_sha256=sha, overwrite=args.overwrite))
    return jobs


def run_rank(args) -> dict | None:
    """One rank's work; rank 0 returns the result."""
    info = distributed.init_distributed(args.device)
    try:
        model, diffusion = load_model_once(args.ckpt, args.config, args.random_init, info)
        sha = weights_sha256(model.state_dict())
        sampler = Sampler(model, diffusion, (model.in_channels, model.resolution, model.resolution),
                          sampler=args.sampler, steps=args.steps, eta=args.eta, bf16=args.bf16, compile=args.compile)
        batch = auto_batch_size(sampler, info.device) if args.batch_size == "auto" else args.batch_size
        inception, ref = load_scoring(args, info) if args.score else (None, None)
        runs = []
        for job in sample_jobs(args, sha, batch):
            out, seed = Path(job.out), job.seed
            score = InceptionStatistics(inception, args.num_samples, info.device, splits=10) if args.score else None
            run = {"seed": seed, "out": str(out), "world_size": info.world_size, "batch_size": batch,
                   "compiled": sampler.plan.compile, **generate(job, sampler, info, score)}
            if score is not None and info.is_main:
                run.update(score.result(out, ref))
            runs.append(run)
        # Every rank waits for rank 0's scoring: a Slurm step ends a minute after its first task
        # exits (srun --wait, for lost nodes), and the last FID can take longer than that.
        distributed.barrier()
        return summary(args, sha, runs) if info.is_main else None
    finally:
        distributed.teardown()


def preflight(args) -> None:
    """Fail before starting ranks: the model loads, the scoring files exist."""
    model, diffusion = load_for_evaluation(args.ckpt, args.config, random_init=args.random_init)
    respace(diffusion, args.steps)  # checks --steps
    for job in sample_jobs(args, weights_sha256(model.state_dict()), batch=1):  # not in the manifest
        check_output(job.out, job)
    for flag, path in (("--ref-stats", args.ref_stats), ("--inception-weights", args.inception_weights)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path} does not exist")


def finish(args, result: dict) -> None:
    write_samples_grid(result["runs"][0]["out"], Path(args.out) / GRID_FILE)  # a look at what was scored
    atomic_write(Path(args.out) / "result.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


TOOL = RankedTool(name="fid_sample.py", module="ddpm_dist.cli.fid_sample", preflight=preflight, run_rank=run_rank,
                  finish=finish, slurm_folder=lambda args: Path(args.out) / "slurm")


def main(argv=None) -> int:
    return run_tool(TOOL, parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
