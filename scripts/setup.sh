#!/usr/bin/env bash
# Create ./.venv (if missing) and install ddpm-dist into it with the given extras.
#   scripts/setup.sh            # the package: enough for the demo
#   scripts/setup.sh test       # + everything the test suite uses
# torch==2.13.0 is pinned first: on CPU machines that version resolves to the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
# DeepSpeed (in the test extras) builds as pure Python; its ops compile on first use.
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check --upgrade pip
pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
if [ -n "$extras" ]; then
  pip install -q --disable-pip-version-check -e ".[$extras]"
else
  pip install -q --disable-pip-version-check -e .
fi
