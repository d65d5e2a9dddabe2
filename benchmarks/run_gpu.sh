#!/usr/bin/env bash
# The full kernel benchmark on a CUDA machine, offline: installs the wheels brought along in
# benchmarks/wheels (liger-kernel, cut-cross-entropy; see benchmarks/README.md), then runs the
# default grid (at most ~8 minutes: --time-budget 480 records whatever is left as skipped; the
# last 150 s, --lce-budget, are kept for the fused linear cross-entropy).
#
#   bash benchmarks/run_gpu.sh [OUT_DIR] [extra benchmarks.kernels flags, e.g. --op linear_cross_entropy]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
    python -m pip install --quiet --no-deps --no-index benchmarks/wheels/*.whl
fi
python -m pip list 2>/dev/null | grep -i -E "^(torch|triton|liger-kernel|cut-cross-entropy) " || true
python -m benchmarks.kernels --out "$out" "$@"
