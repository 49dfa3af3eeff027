#!/usr/bin/env bash
# The prepared GPU check, the goals first: CIFAR-10 training compiled, diffusers compiled in the
# same harness right after, 256² training compiled, sampling compiled at the auto batch with the
# projected 50k-sample time; then the eager and engine rows (single / ddp / fsdp, eager /
# compiled), GroupNorm's memory layout and diffusers at 256². Training runs through the real loop.
# Runs from the repository root, needs no network, keeps to a time budget (GPU_CHECK_BUDGET_S,
# default 420 s) and writes $OUT/gpu_check.json, $OUT/gpu_check.txt (the table, also printed
# last; MFU against the peak it names: 790 TFLOP/s bf16 dense on an H200, as measured there),
# $OUT/children.log (the last lines of every child's log: compile times, recompiles, graph
# breaks, errors) and $OUT/gpu_check.log. The report is also kept in runs/gpu_check_last.json
# (GPU_CHECK_LAST), which outlives the call on a warm device machine, for the second call.
#
#   bash bench/gpu_check.sh                       # first call: the device tool's command,
#                                                 #   carry [".carry/wheels"], timeout_s 480
#   bash bench/gpu_check.sh --rest --budget 150   # second call, while the machine is warm: what the
#                                                 #   first skipped or never reached, timeout_s 180
#   bash bench/gpu_check.sh --smoke               # the same code paths on the CPU, tiny sizes, ~1 minute
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
# own needs (httpx, httpcore, hf-xet, ...) to the download. Carry only .carry/wheels: a local
# smoke run leaves .carry/site (~30 MB of installed files) beside it, which the machine rebuilds.
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

"$PY" bench/gpu_check.py --out "$OUT" --last "${GPU_CHECK_LAST:-runs/gpu_check_last.json}" \
    ${GPU_CHECK_BUDGET_S:+--budget "$GPU_CHECK_BUDGET_S"} "$@" 2>&1 \
    | tee "$OUT/gpu_check.log"
