#!/usr/bin/env bash
# Everything a lent GPU machine should do in one call, offline, in about 9 minutes, writing
# under one output folder:
#   1. the kernel tests on CUDA tensors (compiled kernels, not the interpreter), at most 150 s;
#   2. the kernel benchmark grid (softmax, log_softmax, cross_entropy, linear_cross_entropy
#      against torch, torch.compile and the peers whose wheels travelled in benchmarks/wheels),
#      240 s of which the last 90 s are kept for the fused linear cross-entropy, then 50 s more
#      for the RL head (linear_cross_entropy_rl: per-token loss and entropy at a temperature);
#   3. the launch-table sweep (benchmarks/tune.py), 80 s;
#   4. summary.md: GPU, versions, test counts and failures, the files written.
# A step that fails or runs out of time is recorded in the summary; the next one still runs.
#
#   bash benchmarks/run_gpu.sh OUT_DIR              # on the GPU machine
#   bash benchmarks/run_gpu.sh --dry-run OUT_DIR    # here: the same steps under Triton's
#                                                   # interpreter on tiny shapes (CI runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out="${1:-benchmarks/results/gpu-run}"
mkdir -p "$out"
summary="$out/summary.md"

failed=0
step() {  # step NAME COMMAND...: run, keep its output, record its exit status
    local name=$1; shift
    local start=$SECONDS
    "$@" >"$out/$name.log" 2>&1
    local status=$?
    [ $status = 0 ] || failed=1
    echo "| $name | $status | $((SECONDS - start)) s | \`$*\` |" >>"$summary"
    tail -n 3 "$out/$name.log"
}

{
    echo "# GPU run $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ $dry = 1 ] && echo ' (dry run, CPU interpreter)')"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
    python --version 2>&1
    python -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|liger-kernel|cut-cross-entropy|quack-kernels) " || true
    echo '```'
    echo
    echo "| step | exit status | time | command |"
    echo "|---|---:|---:|---|"
} >"$summary"

if [ $dry = 1 ]; then
    export TRITON_INTERPRET=1
    step tests timeout 300 python -m pytest -q -p no:cacheprovider tests/test_softmax.py -k "worked_examples or block_boundaries"
    step kernels python -m benchmarks.kernels --smoke --out "$out"
    step tune python -m benchmarks.tune --smoke --out "$out"
else
    if compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
        python -m pip install --quiet --no-deps --no-index benchmarks/wheels/*.whl \
            >"$out/wheels.log" 2>&1 || echo "wheels: see wheels.log" >>"$summary"
    fi
    step tests timeout 150 python -m pytest -q -x -p no:cacheprovider --device cuda \
        tests/test_softmax.py tests/test_cross_entropy.py tests/test_tiles.py \
        tests/test_linear_cross_entropy.py tests/test_registration.py
    step kernels python -m benchmarks.kernels --out "$out" --time-budget 240 --lce-budget 90 \
        --rl-budget 50
    step tune python -m benchmarks.tune --out "$out" --time-budget 80
fi

{
    echo
    echo "Tests: $(grep -E '(passed|failed|error)' "$out/tests.log" | tail -n 1)"
    echo
    echo '```'
    grep -E '^(FAILED|ERROR)' "$out/tests.log" | head -n 50 || true
    echo '```'
    echo
    echo "Files: $(cd "$out" && ls | tr '\n' ' ')"
} >>"$summary"
echo "summary: $summary"
exit $failed
