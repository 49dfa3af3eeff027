"""Convert between diffusers DDPM folders and our model files: `python tools/convert_diffusers.py --help`.

The same as the console script `ddpm-convert-diffusers`; the code is ddpm_dist/cli/convert_diffusers.py.
"""
from ddpm_dist.cli.convert_diffusers import main

if __name__ == "__main__":
    raise SystemExit(main())
