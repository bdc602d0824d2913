#!/usr/bin/env bash
# Device run for the CUDA selective scan: GPU tests, then `bytemamba bench scan "$@"`.
# Installs nothing. Full logs go under $OUT (tests.log, bench.log); the bench table prints last.
#   SKIP_TESTS=1   skip the tests;   TESTS=...   which tests (default tests/ops/test_scan_cuda.py)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bytemamba_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider \
    ${TESTS:-tests/ops/test_scan_cuda.py} 2>&1 | tee "$OUT/tests.log" | tail -60
fi
timeout "${BENCH_TIMEOUT:-300}" python3 -m bytemamba.bench scan "$@" 2>&1 | tee "$OUT/bench.log"
