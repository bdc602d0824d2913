#!/usr/bin/env bash
# Device run for fast generation (issue 7): GPU tests of the decode step and graph decoding, then
# `bytemamba bench generate "$@"`. Installs nothing. Logs under $OUT (tests.log, bench.log); the table prints last.
#   SKIP_TESTS=1  skip the tests;  SKIP_BENCH=1  skip the benchmark;  TESTS=...  which tests
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bytemamba_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider -x \
    ${TESTS:-tests/ops/test_step.py tests/test_decode.py} 2>&1 | tee "$OUT/tests.log" | tail -40
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-150}" python3 -m bytemamba.bench generate "$@" 2>&1 | tee "$OUT/bench.log"
fi
