#!/usr/bin/env bash
# Set up and train the demo model on the embedded handwritten digits (CPU, a few minutes).
# Writes runs/demo_digits/: config.yaml, checkpoints/, TensorBoard event files, samples/*.png, model.safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
start=$(date +%s)
python -m ddpm_dist.train --config configs/demo_digits.yaml "$@"
out=$(python -c "import sys; from ddpm_dist.config import load_config; print(load_config('configs/demo_digits.yaml', sys.argv[1:]).out_dir)" "$@")
python tools/export.py "$out" --out "$out/model.safetensors"
echo "demo finished in $(( $(date +%s) - start )) s; samples: $(ls "$out"/samples/*.png | tail -n 1)"
echo "TensorBoard: .venv/bin/tensorboard --logdir $(dirname "$out")   # every run in that folder, by name"
