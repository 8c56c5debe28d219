#!/usr/bin/env bash
# A registry holding one tiny package (CURRENT), for smoke-testing the inference image:
#   deploy/images/tiny-registry.sh PYTHON_VENV_BIN OUT_DIR    e.g. .venv/bin /tmp/smoke
# Synthetic data, configs/tiny.json, one short epoch on one thread (about a minute): predictions are
# poor but real. Uses only the gcodefp CLI, so it follows the code wherever the modules move.
set -euo pipefail
bin=${1:?usage: tiny-registry.sh VENV_BIN OUT_DIR}
out=${2:?usage: tiny-registry.sh VENV_BIN OUT_DIR}
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 WANDB_MODE=disabled
rm -rf "$out/work" "$out/registry"
mkdir -p "$out/work"
w=$out/work
"$bin/gcodefp" build-dataset --config configs/tiny.json --output "$w/dataset"
"$bin/gcodefp" train --config configs/tiny.json --output "$w/train" --dataset "$w/dataset" --seed 0 --epochs 1 --threads 1
"$bin/gcodefp" export --checkpoint "$w/train/model_seed0/checkpoint_best.pt" --output "$w/export/model.onnx" \
  --dataset "$w/dataset" --verify-windows 32
"$bin/gcodefp" package build "$w/export" --registry "$out/registry" --version smoke-v1 --promote
rm -rf "$w"
