#!/usr/bin/env bash
# Device run for fast generation (issue 7): GPU tests of the decode step and graph decoding (PDL_TESTS: these
# tests again with BYTEMAMBA_STEP_PDL=1), then `bytemamba bench generate "$@"` (with the Transformer baseline),
# then the decode-step variants side by side (scripts/step_variants.py; CONFIGS / VARIANTS below). Installs
# nothing. Logs under $OUT (tests.log, tests_pdl.log, bench.log, variants.log); the variants table prints last.
#   SKIP_TESTS=1  skip the tests;  SKIP_VARIANTS=1  skip the variants;  SKIP_BENCH=1  skip the benchmark
#   TESTS=...     which tests (default tests/ops/test_step.py tests/test_decode.py)
#   CONFIGS=...   MODEL:BATCH list for the variants;  VARIANTS=...  NAME:SETTINGS[@CONFIGS] list (see the script)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bytemamba_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-100}" python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider \
    ${TESTS:-tests/ops/test_step.py tests/test_decode.py} 2>&1 | tee "$OUT/tests.log" | tail -40
fi
if [ -n "${PDL_TESTS:-}" ]; then      # the same tests again with programmatic dependent launch
  BYTEMAMBA_STEP_PDL=1 timeout "${PDL_TEST_TIMEOUT:-40}" python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider \
    $PDL_TESTS 2>&1 | tee "$OUT/tests_pdl.log" | tail -15
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-120}" python3 -m bytemamba.bench generate "$@" 2>&1 | tee "$OUT/bench.log"
fi
if [ "${SKIP_VARIANTS:-0}" != 1 ]; then
  timeout "${VARIANTS_TIMEOUT:-120}" python3 scripts/step_variants.py \
    --configs ${CONFIGS:-byte353m:1 byte353m:64 audio6m:1 audio6m:256} \
    --variants ${VARIANTS:-"base:" "pdl:BYTEMAMBA_STEP_PDL=1"} ${VARIANT_ARGS:-} 2>&1 | tee "$OUT/variants.log" \
    | grep -v "^#  "
fi
