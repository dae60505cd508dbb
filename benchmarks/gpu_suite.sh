#!/usr/bin/env bash
# The GPU suite in one command (see benchmarks/README.md and benchmarks/gpu_suite.py):
#   bash benchmarks/gpu_suite.sh [--dry-run] [--budget-s 480] [--benches lora,...|none] [--skip build,...] [OUT_DIR]
# Builds the CUDA extension, runs the gpu tests, compute-sanitizer over tests/cuda, every benchmark, the plots and
# OUT_DIR/summary.md. Runs from the source tree (PYTHONPATH=.), installs nothing. Without a GPU (or --dry-run) the
# GPU steps are skipped, and said so, and the benchmarks run at smoke size.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python}" -m benchmarks.gpu_suite "$@"
