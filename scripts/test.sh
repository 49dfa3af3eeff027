#!/usr/bin/env bash
# Set up and run the test suite, with the real services it needs (S3 server, Slurm cluster).
#   scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,s3
. .venv/bin/activate
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
python -m pytest "$@"
