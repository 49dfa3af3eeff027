"""Convert between diffusers DDPM folders and our model files.

    python tools/convert_diffusers.py import ddpm-cifar10-32/ --out cifar10.safetensors
    python tools/convert_diffusers.py export cifar10.safetensors --out cifar10-diffusers/

`import` reads a local folder (unet/ + scheduler/, or config.json, diffusion_pytorch_model.*
and scheduler_config.json at the top, as on the hub); nothing is downloaded. `export` writes a
folder that diffusers' DDPMPipeline / UNet2DModel / DDPMScheduler.from_pretrained load.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ddpm_dist.modelio.diffusers_format import ConversionError, export_diffusers, import_diffusers


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="diffusers folder → our model file")
    imp.add_argument("folder", metavar="DIR")
    imp.add_argument("--out", required=True, metavar="MODEL", help=".safetensors or .pt")
    exp = sub.add_parser("export", help="our model file → diffusers folder")
    exp.add_argument("model", metavar="MODEL")
    exp.add_argument("--out", required=True, metavar="DIR")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        if args.command == "import":
            cfg = import_diffusers(args.folder, args.out)
            print(f"wrote {args.out}: model {dataclasses.asdict(cfg.model)}, "
                  f"diffusion {dataclasses.asdict(cfg.diffusion)}")
        else:
            export_diffusers(args.model, args.out)
            print(f"wrote {args.out}/ (model_index.json, unet/, scheduler/)")
    except (ConversionError, FileNotFoundError, ValueError) as err:
        sys.exit(f"convert_diffusers.py: error: {err}")


if __name__ == "__main__":
    main()
