"""FID during training: evaluate each new checkpoint of a run, as its own job, into TensorBoard.

    python tools/track_fid.py runs/cifar10 --num-samples 10000 --sampler ddim --steps 100 \\
        --ref-stats runs/cifar10/eval/reference_train.npz --inception-weights pt_inception.pth \\
        --launcher slurm --world-size 8 --partition gpu

Start it beside the training job (on a login node, or as a small CPU job). For each new
checkpoint it exports the EMA weights and runs tools/fid_sample.py with the sampling flags given
here (with --launcher slurm: a Slurm job of its own), then writes eval/fid10k and eval/is10k at
that step into the run's TensorBoard (an event file in RUN) and RUN/eval/track/fid10k.jsonl. It
ends once the run's last step is evaluated, with --once after the checkpoints there now, or after
--max-idle-min without a new one. Exit status 1 if an evaluation failed twice.
"""
from __future__ import annotations

import argparse
import functools
import logging
import subprocess
import sys
from pathlib import Path

from ddpm_dist.evaluation.track import Tracker, watch
from ddpm_dist.launch.ranks import add_launch_arguments

log = logging.getLogger(__name__)


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("run", help="the training run folder (its checkpoints/ and TensorBoard event files)")
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--ref-stats", required=True, metavar="NPZ", help="reference mu/sigma (tools/fid_stats.py)")
    p.add_argument("--inception-weights", metavar="FILE", help="pytorch-fid Inception state dict")
    p.add_argument("--sampler", default="ddim", choices=("ddpm", "ddim"))
    p.add_argument("--steps", type=int, default=100, help="respaced sampling steps (0: all T)")
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    add_launch_arguments(p)
    p.add_argument("--poll", type=float, default=60.0, help="seconds between looks for new checkpoints")
    p.add_argument("--once", action="store_true", help="evaluate the checkpoints there now, then exit")
    p.add_argument("--max-idle-min", type=float, default=24 * 60, help="stop after this long without one")
    p.add_argument("--eval-timeout-min", type=float, default=12 * 60, help="per checkpoint")
    p.add_argument("--keep-samples", action="store_true", help="keep each checkpoint's PNGs")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.poll <= 0:
        p.error("--num-samples and --poll must be positive")
    sample = ["--ref-stats", args.ref_stats, "--sampler", args.sampler, "--batch-size", str(args.batch_size),
              "--device", args.device, "--seed", str(args.seed), "--world-size", str(args.world_size),
              "--launcher", args.launcher, "--gpus-per-node", str(args.gpus_per_node),
              "--timeout-min", str(args.timeout_min)]
    for flag, value in (("--inception-weights", args.inception_weights), ("--steps", args.steps or None),
                        ("--partition", args.partition), ("--cpus-per-task", args.cpus_per_task),
                        ("--nodes", args.nodes)):
        if value is not None:
            sample += [flag, str(value)]
    return args, sample


def sample_and_score(model: Path, out: Path, *, num_samples: int, sample_args: list[str], timeout_s: float) -> None:
    """tools/fid_sample.py on `model` into `out`, as a process of its own; one line if it fails."""
    cmd = [sys.executable, "-m", "ddpm_dist.cli.fid_sample", "--ckpt", str(model), "--num-samples",
           str(num_samples), "--out", str(out), *sample_args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no result within {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1])
    for line in proc.stdout.splitlines():
        if line.startswith("submitted Slurm job"):
            log.info("%s: %s", out.parent.name, line)


def main(argv=None) -> int:
    args, sample = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run = Path(args.run)
    for what, path in (("run folder", run / "checkpoints"), ("--ref-stats", Path(args.ref_stats))):
        if not path.exists():
            print(f"track_fid.py: error: {what} {path} does not exist", file=sys.stderr)
            return 2
    evaluate = functools.partial(sample_and_score, num_samples=args.num_samples, sample_args=sample,
                                 timeout_s=args.eval_timeout_min * 60)
    tracker = Tracker(run, args.num_samples, evaluate, args.keep_samples)
    failed = watch(tracker, poll_s=args.poll, once=args.once, max_idle_s=args.max_idle_min * 60)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
