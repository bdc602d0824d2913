#!/usr/bin/env bash
# Device run for fast generation (issue 7): GPU tests of the decode step and graph decoding, then
# `bytemamba bench generate "$@"` (default kernels, with the Transformer baseline), then the opt-in v2 kernels
# (BYTEMAMBA_STEP_V2=1: gemv_step with 8 loads in flight, ssm_step_rows) with the fused GEMV path up to batch 8.
# Installs nothing. Logs under $OUT (tests.log, bench.log, bench_v2.log); the tables print last. ~2-3 minutes.
#   SKIP_TESTS=1  skip the tests;  SKIP_BENCH=1  skip the default benchmark;  SKIP_V2=1  skip the v2 benchmark
#   TESTS=...     which tests (default tests/ops/test_step.py tests/test_decode.py)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bytemamba_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-100}" python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider \
    ${TESTS:-tests/ops/test_step.py tests/test_decode.py} 2>&1 | tee "$OUT/tests.log" | tail -40
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-120}" python3 -m bytemamba.bench generate "$@" 2>&1 | tee "$OUT/bench.log"
fi
if [ "${SKIP_V2:-0}" != 1 ]; then
  echo "### v2 kernels (BYTEMAMBA_STEP_V2=1), fused GEMV path up to batch 8"
  BYTEMAMBA_STEP_V2=1 timeout "${V2_TIMEOUT:-90}" python3 -m bytemamba.bench generate --no-transformer \
    --gemv-max-batch 8 --breakdown byte353m:1 byte353m:64 2>&1 | tee "$OUT/bench_v2.log" | grep -v "^#  " | tail -14
fi
