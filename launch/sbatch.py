"""Submit launch/train_*.sh with the settings resolved at submission:
`python launch/sbatch.py [sbatch options] launch/train_lsun.sh [key=value ...]`.

The code is ddpm_dist/launch/sbatch.py.
"""
from ddpm_dist.launch.sbatch import main

if __name__ == "__main__":
    raise SystemExit(main())
