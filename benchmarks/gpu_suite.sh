#!/usr/bin/env bash
# The GPU suite in one command (see benchmarks/README.md and benchmarks/gpu_suite.py):
#   bash benchmarks/gpu_suite.sh [--dry-run] [--budget-s 480] [--benches lora,...|none] [--skip build,...] [--pack DIR]
#                                [OUT_DIR]
# With $OUT set and no OUT_DIR (the lent device machine), it works in /tmp and packs into $OUT:
# gpu_suite.tar.gz + summary.md. Unpack here with: python -m benchmarks.gpu_suite --import FILE.
# Builds the CUDA extension, runs the gpu tests, compute-sanitizer over tests/cuda, every benchmark, the plots and
# OUT_DIR/summary.md. Runs from the source tree (PYTHONPATH=.), installs nothing. Without a GPU (or --dry-run) the
# GPU steps are skipped, and said so, and the benchmarks run at smoke size.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The python that holds torch: $PYTHON, else python3 (the GPU image has only python3 on PATH for sure), else python.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ]; then echo "gpu_suite.sh: no python with torch found (set PYTHON=...)" >&2; exit 2; fi
exec "$PY" -m benchmarks.gpu_suite "$@"
