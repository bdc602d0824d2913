#!/bin/bash
# The persistent step's device call (run from the repository root on the lent H200, logs under $OUT): its GPU tests,
# the kernel bench (per-phase profile at b 64; BENCH_VARIANTS: more NAME=DEF+DEF builds), then `bench generate`
# on the persistent path and on the path it replaces (persistent off).
export OMP_NUM_THREADS=4
O=${OUT:-/tmp}
timeout 62 python3 -m pytest -q -m gpu tests/ops/test_persistent_step.py -p no:cacheprovider > $O/tests.log 2>&1
tail -4 $O/tests.log
timeout 52 python3 scripts/bench_persistent_step.py --batches 8 64 --variants $BENCH_VARIANTS \
    --profile 64 --no-model > $O/kernel.log 2>&1
grep -v Warn $O/kernel.log | tail -16
BYTEMAMBA_PERSISTENT_STEP=1 timeout 40 python3 -m bytemamba.bench generate \
    --no-profile --models byte353m --batches 8 64 > $O/e2e_persistent.log 2>&1
grep "^|" $O/e2e_persistent.log | tail -6
BYTEMAMBA_PERSISTENT_STEP=0 timeout 30 python3 -m bytemamba.bench generate --no-profile --models byte353m \
    --batches 8 64 --no-transformer > $O/e2e_current.log 2>&1
grep "^|" $O/e2e_current.log | tail -4
