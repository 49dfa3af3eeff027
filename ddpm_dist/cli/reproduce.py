"""From raw data to the paper's table in one command: a Slurm dependency chain.

    python launch/reproduce.py configs/cifar10.yaml --partition gpu --nodes 1 --eval-world-size 8
    python launch/reproduce.py configs/lsun_church.yaml --raw /data/church_outdoor_train_lmdb \\
        data.source=s3://bucket/lsun-church-256/ --prepare-here

Stages (afterok): prepare (raw data → shards, test split, reference statistics, Inception
weights) → train (requeues itself) → export (EMA weights) → fid (N samples × seed sets on W
ranks, FID / IS) and nll (bits/dim on the test split) → report (RUN/report.md, report.json).
Each stage skips what is done: rerun the same command after a failure to continue the chain;
once the report exists it does nothing. Compute nodes without internet: --prepare-here runs
the first stage on this machine, which downloads CIFAR-10 and pytorch-fid's Inception weights.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import secrets
import sys
import time
from pathlib import Path

from ddpm_dist.config import Config, ConfigError, config_from_dict, config_to_dict, load_config
from ddpm_dist.launch.ranks import eval_resources, submit_command
from ddpm_dist.launch.slurm import JobResources
from ddpm_dist.reproduce.datasets import dataset_for
from ddpm_dist.reproduce.plan import Plan, Resources
from ddpm_dist.utils.files import atomic_write


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("config", help="a paper config, e.g. configs/cifar10.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value training settings (data.source=..., ...)")
    p.add_argument("--dataset", help="the data recipe (default: the config's file name, e.g. cifar10)")
    p.add_argument("--raw", help="raw data: CIFAR-10 folder or tarball (else downloaded), LSUN lmdb, image folder")
    p.add_argument("--raw-test", help="--dataset folder: a held-out image folder for bits/dim")
    p.add_argument("--raw-dir", default="data/raw", help="where downloads and extracted archives go")
    p.add_argument("--prepare-here", action="store_true", help="run the prepare stage on this machine")
    p.add_argument("--inception-weights", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                                               "(default: torch.hub's cache, downloaded by prepare)")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--seeds", type=int, default=3, help="seed sets: FID mean ± std")
    p.add_argument("--sample-steps", type=int, help="respaced sampling steps (default: all T)")
    p.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    p.add_argument("--nll-images", type=int, help="first N test images (default: all)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 on CPU-only clusters")
    p.add_argument("--tasks-per-node", type=int, help="training tasks per node (default: one per GPU)")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", type=int, default=24 * 60, help="training time limit per run, minutes")
    p.add_argument("--eval-world-size", type=int, default=8,
                   help="ranks for sampling and bits/dim, spread over the --nodes (a multiple of --nodes)")
    p.add_argument("--eval-time", type=int, default=12 * 60, help="evaluation time limit, minutes")
    p.add_argument("--stage", choices=("prepare", "report"), help=argparse.SUPPRESS)  # inside a chain job
    p.add_argument("--settings", help=argparse.SUPPRESS)  # a chain job's: resolved when it was submitted
    args = p.parse_args(argv)
    for flag in ("num_samples", "seeds", "eval_world_size", "nodes", "cpus_per_task"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    return args


def build_plan(args) -> Plan:
    """Raises ConfigError / ValueError (one line) for a config or setting no stage can use."""
    name = args.dataset or Path(args.config).stem
    dataset = dataset_for(name)
    if args.raw_test and dataset.source != "folder":
        raise ValueError(f"--raw-test is for image-folder datasets; {name} has its own test set or none")
    if dataset.source in ("lsun", "folder") and not args.raw:
        raise ValueError(f"{name}: pass --raw, the {dataset.raw}")
    if args.settings:
        overrides, cfg = read_settings(args.settings)
    else:
        overrides = list(args.overrides)
        cfg = load_config(args.config, overrides)
        if cfg.data.source == "digits":  # the demo reads the digits from memory; the chain from shards
            overrides.append(f"data.source={Path(args.raw_dir).parent / 'shards' / name}")
            cfg = load_config(args.config, overrides)
    from ddpm_dist.metrics.inception import default_weights_path
    weights = Path(args.inception_weights) if args.inception_weights else default_weights_path()
    resources = Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                          cpus_per_task=args.cpus_per_task, partition=args.partition, account=args.account,
                          train_time_min=args.time, eval_world_size=args.eval_world_size,
                          eval_time_min=args.eval_time)
    try:  # checked before any stage is submitted, not when the chain reaches the evaluation
        eval_resources(args.eval_world_size, gpus_per_node=args.gpus_per_node, nodes=args.nodes)
    except ValueError as e:
        raise ValueError(f"evaluation runs on the {args.nodes} training node(s): "
                         + str(e).replace("--world-size", "--eval-world-size")) from None
    return Plan(config=args.config, overrides=tuple(overrides), cfg=cfg, name=name, dataset=dataset, raw=args.raw,
                raw_test=args.raw_test, raw_dir=Path(args.raw_dir), inception_weights=weights, num_samples=args.num_samples,
                seeds=args.seeds, sample_steps=args.sample_steps, sampler=args.sampler,
                nll_images=args.nll_images, resources=resources)


def write_settings(plan: Plan, stage: str) -> Path:
    """The plan's resolved settings, in a file of one submitted stage's own (RUN/slurm/): its job
    reads them instead of the YAML file, which may be edited while the job waits in the queue."""
    path = plan.slurm_folder / f"{stage}-settings-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"overrides": list(plan.overrides), "settings": config_to_dict(plan.cfg)}))
    return path


def read_settings(path: str) -> tuple[list[str], Config]:
    """(overrides, config) of `write_settings`' file, validated as any config is."""
    try:
        data = json.loads(Path(path).read_text())
        overrides, settings = data["overrides"], data["settings"]
        if not (isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)):
            raise TypeError("overrides are not a list of strings")
        return overrides, config_from_dict(settings)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{path}: not a chain stage's settings ({type(e).__name__}: {e})") from None


def stage_job(plan: Plan, stage: str, argv: list[str]) -> tuple[str, list[str]]:
    """`stage_command`, and for this command's own stages (prepare, report) the settings
    resolved now, written for the job to read."""
    module, args = stage_command(plan, stage, argv)
    if stage in ("prepare", "report"):
        args = [*args, "--settings", str(write_settings(plan, stage))]
    return module, args


def stage_command(plan: Plan, stage: str, argv: list[str]) -> tuple[str, list[str]]:
    """The tool module and arguments a chain stage's job runs (every stage but train)."""
    if stage in ("prepare", "report"):  # this command again, same arguments, one stage
        return "ddpm_dist.cli.reproduce", [*argv, "--stage", stage]
    if stage == "export":
        return "ddpm_dist.cli.export", [str(plan.run), "--out", str(plan.model_file)]
    if stage == "fid":
        args = ["--ckpt", str(plan.model_file), "--num-samples", str(plan.num_samples), "--seeds", str(plan.seeds),
                "--out", str(plan.fid_dir), "--ref-stats", str(plan.reference_stats),
                "--inception-weights", str(plan.inception_weights), "--sampler", plan.sampler,
                "--batch-size", "auto", "--world-size", str(plan.resources.eval_world_size)]
        return "ddpm_dist.cli.fid_sample", args + (["--steps", str(plan.sample_steps)] if plan.sample_steps else [])
    if stage == "nll":
        args = ["--ckpt", str(plan.model_file), "--data", plan.test_data, "--out", str(plan.nll_file),
                "--world-size", str(plan.resources.eval_world_size)]
        return "ddpm_dist.cli.eval_nll", args + (["--num-images", str(plan.nll_images)] if plan.nll_images else [])
    raise ValueError(f"no command for stage {stage!r}")


def submit_stage(argv: list[str], plan: Plan, stage: str, res: JobResources, after: list[str]) -> str:
    """A chain stage's job: its tool on `res`, after the jobs `after` (the chain's `SubmitStage`)."""
    module, args = stage_job(plan, stage, argv)
    return submit_command(module, args, plan.slurm_folder, res, after=after).job_id


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        plan = build_plan(args)
        if args.stage == "prepare":
            from ddpm_dist.reproduce.prepare import prepare
            prepare(plan)
        elif args.stage == "report":
            from ddpm_dist.reproduce.report import write_report
            write_report(plan)
            print(f"wrote {plan.run / 'report.md'}")
        else:
            from ddpm_dist.reproduce.chain import run_chain
            jobs = run_chain(plan, functools.partial(submit_stage, argv), prepare_here=args.prepare_here)
            print(f"report: {plan.run / 'report.md'}" + (" (queued)" if jobs else ""))
    except (ConfigError, ValueError, OSError, RuntimeError) as err:  # DataError is a RuntimeError
        print(f"reproduce: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
