#!/bin/bash
# The persistent step's device call (run from the repository root on the lent H200, logs under $OUT): its GPU tests,
# the kernel bench (default, MCAST, FENCE builds; per-phase profile at b 64), then `bench generate` with the faster
# of default / MCAST at b 64, the other build, and today's path (persistent off). Short table last.
export OMP_NUM_THREADS=4
O=${OUT:-/tmp}
timeout 62 python3 -m pytest -q -m gpu tests/ops/test_persistent_step.py -p no:cacheprovider > $O/tests.log 2>&1
tail -4 $O/tests.log
timeout 52 python3 scripts/bench_persistent_step.py --batches 8 64 --variants mcast=MCAST=1 fence1=FENCE=1 \
    --profile 64 --no-model > $O/kernel.log 2>&1
grep -v Warn $O/kernel.log | tail -16
D=$(awk -F'|' '$2==" 64 " && $3==" default " {print $4}' $O/kernel.log)
M=$(awk -F'|' '$2==" 64 " && $3==" mcast " {print $4}' $O/kernel.log)
BEST=""; OTHER="MCAST=1"
if python3 -c "import sys; sys.exit(0 if float('${M:-1e9}') < float('${D:-1e9}') else 1)"; then BEST="MCAST=1"; OTHER=""; fi
echo "build for bench generate: '${BEST:-default}'"
BYTEMAMBA_PERSISTENT_STEP=1 BYTEMAMBA_PERSISTENT_DEFINES=$BEST timeout 40 python3 -m bytemamba.bench generate \
    --no-profile --models byte353m --batches 8 64 > $O/e2e_persistent.log 2>&1
grep "^|" $O/e2e_persistent.log | tail -6
BYTEMAMBA_PERSISTENT_STEP=0 timeout 20 python3 -m bytemamba.bench generate --no-profile --models byte353m \
    --batches 64 --no-transformer --new 256 > $O/e2e_current.log 2>&1
grep "^|" $O/e2e_current.log | tail -3
BYTEMAMBA_PERSISTENT_STEP=1 BYTEMAMBA_PERSISTENT_DEFINES=$OTHER timeout 16 python3 -m bytemamba.bench generate \
    --no-profile --models byte353m --batches 64 --no-transformer --new 256 > $O/e2e_other.log 2>&1
grep "^|" $O/e2e_other.log | tail -3
