#!/usr/bin/env bash
# This project's steps against timm's on ONE card, same run, table with ratios, memory and MFU last:
# CoAtNet-0 at batch 256 and CoAtNet-2 at batch 128, 224 px, bf16, train and inference.
#
#   bash benchmarks/run_gpu.sh [--full] [--budget_s 480] [--rows REGEX]   (benchmarks/compare.py)
#
# Each row runs in its own process under the remaining time budget (default 480 s, compiles
# included: the quick run fits one 10-minute device command); a failing or timed-out row is recorded
# and the others go on. Rows are appended as they finish to a results file new to each run, in
# $OUT when it is set (the device tool's return folder) else build/bench/, with bench.log beside it.
# Inference rows build no optimizer state. The device image has python3, jax, torch and timm but
# no ml_collections: carry its pure-Python wheel in .whl (see benchmarks/README.md); it is put on
# PYTHONPATH here when missing. Nothing from TensorFlow is imported.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python3 || command -v python) || { echo "error: no python3 on PATH" >&2; exit 1; }

if ! "$PY" -c 'import ml_collections' 2>/dev/null; then
  # A pure-Python wheel imports straight from its zip: nothing is installed.
  WHEEL=$(ls .whl/ml_collections-*.whl build/wheels/ml_collections-*.whl 2>/dev/null | head -1)
  if [[ -z "$WHEEL" ]]; then
    echo "error: ml_collections is missing; carry its wheel in .whl (benchmarks/README.md)" >&2
    exit 1
  fi
  export PYTHONPATH="$PWD/$WHEEL${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.compare "$@"
