"""Write WebDataset tar shards + index.json from images: `python tools/make_shards.py --help`.

The same as the console script `ddpm-make-shards`; the code is ddpm_dist/cli/make_shards.py.
"""
from ddpm_dist.cli.make_shards import main

if __name__ == "__main__":
    raise SystemExit(main())
