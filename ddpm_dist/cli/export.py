"""Write a training run's EMA weights as one model file for sampling.

    python tools/export.py runs/cifar10 --out cifar10_ema.safetensors
    python tools/export.py runs/cifar10/checkpoints/step_00800000 --out cifar10_ema.pt
"""
import argparse
import sys

from ddpm_dist.config import ConfigError
from ddpm_dist.modelio.source import export_checkpoint
from ddpm_dist.utils.urls import control_character_error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run folder (its newest checkpoint) or a checkpoint folder")
    parser.add_argument("--out", required=True, help="model file: .safetensors or .pt (weights only)")
    args = parser.parse_args(argv)
    try:
        if error := control_character_error(args.out, "--out"):  # a file name: no newline, no escape
            raise ValueError(error)
        export_checkpoint(args.source, args.out)
    except (ConfigError, ValueError) as e:  # ModelSourceError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (EMA weights of {args.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
