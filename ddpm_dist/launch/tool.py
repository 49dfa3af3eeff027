"""The skeleton of a distributed evaluation tool (tools/fid_sample.py, tools/eval_nll.py).

    check the inputs once → start W ranks here or on Slurm, unless they exist already
    (torchrun, srun, or a rank we started) → each rank does its share → rank 0 finishes
    (writes and prints the result)

Errors a user can fix end the tool with one line, `<tool>: error: <what to do>`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ddpm_dist.launch.ranks import needs_launch, run_local, run_slurm

# What a user can fix: a missing file, a bad value (ConfigError and ModelSourceError are
# ValueErrors), a runtime condition the tool explains (no GPU, no Inception weights, ...).
USER_ERRORS = (FileNotFoundError, ValueError, RuntimeError)


@dataclass(frozen=True)
class RankedTool:
    name: str                                              # in error lines: "fid_sample.py"
    module: str                                            # each rank runs `python -m module argv`
    preflight: Callable[[argparse.Namespace], None]        # raise before any rank starts
    run_rank: Callable[[argparse.Namespace], dict | None]  # this rank's share; rank 0 returns the result
    finish: Callable[[argparse.Namespace, dict], None]     # rank 0: write and print the result
    slurm_folder: Callable[[argparse.Namespace], Path]     # submitit logs


def run_tool(tool: RankedTool, args: argparse.Namespace, argv: list[str] | None) -> int:
    """The tool's main, given its parsed `args` and the raw `argv` to pass on to the ranks."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if needs_launch(args.world_size):
            tool.preflight(args)  # one error line here, not one per rank
            if args.launcher == "slurm":
                return run_slurm(tool.module, argv, args.world_size, gpus_per_node=args.gpus_per_node,
                                 folder=tool.slurm_folder(args), partition=args.partition,
                                 timeout_min=args.timeout_min, cpus_per_task=args.cpus_per_task,
                                 nodes=args.nodes)
            return run_local(tool.module, argv, args.world_size)
        result = tool.run_rank(args)
        if result is not None:
            tool.finish(args, result)
    except USER_ERRORS as err:
        sys.exit(f"{tool.name}: error: {err}")
    return 0
