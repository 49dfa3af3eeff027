#!/usr/bin/env bash
# The prepared GPU check: training images/s through the real loop (single / ddp / fsdp, eager /
# compiled, CIFAR-10 and 256²), the ratio to diffusers, sampling rate and the projected 50k-sample
# time, GroupNorm's memory layout. Runs from the repository root, needs no network, keeps to a
# time budget (GPU_CHECK_BUDGET_S, default 420 s) and writes $OUT/gpu_check.json,
# $OUT/gpu_check.txt (the table, also printed last), $OUT/children.log and $OUT/gpu_check.log.
#
#   bash bench/gpu_check.sh            # on the GPU machine; OUT defaults to runs/gpu_check
#   bash bench/gpu_check.sh --smoke    # the same code paths on the CPU, tiny sizes, < 1 minute
#
# Extra arguments go to bench/gpu_check.py (e.g. --only cifar10, --budget 300).
#
# diffusers (for the ratio) is not installed on the GPU machine and it has no network. Wheels in
# .carry/wheels/ are installed into .carry/site here and put first on PYTHONPATH. Fill the folder
# on a machine with network, from the repository root:
#
#   pip download --no-deps --only-binary=:all: -d .carry/wheels diffusers==0.42.1
#
# diffusers alone is what importing UNet2DModel and the DDPM / DDIM pipelines needs on top of the
# GPU machine's image (Python 3.12 with torch, numpy, Pillow, filelock, regex, requests,
# safetensors and huggingface_hub 1.33; diffusers 0.42.1 asks for huggingface_hub >= 1.32). On
# Python >= 3.8 it reads package metadata with the standard library, so importlib_metadata is
# not needed. Where huggingface_hub is missing or older than 1.32, add huggingface_hub and its
# own needs (httpx, httpcore, hf-xet, ...) to the download. Then call the device tool with
# command `bash bench/gpu_check.sh`, carry [".carry"], timeout_s 480.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

if compgen -G ".carry/wheels/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target .carry/site .carry/wheels/*.whl; then
        export PYTHONPATH="$PWD/.carry/site:$PYTHONPATH"
    else
        echo "carried wheels did not install; going on without them" >&2
    fi
fi

"$PY" bench/gpu_check.py --out "$OUT" ${GPU_CHECK_BUDGET_S:+--budget "$GPU_CHECK_BUDGET_S"} "$@" 2>&1 \
    | tee "$OUT/gpu_check.log"
