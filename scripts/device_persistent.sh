#!/bin/bash
# The persistent step's device call (run from the repository root on the lent H200, logs under $OUT).
#   bash scripts/device_persistent.sh        its GPU tests, the kernel bench (per-phase profile at b 64;
#                                            BENCH_VARIANTS: more NAME=DEF+DEF builds), then `bench generate` on the
#                                            persistent path and on the path it replaces (persistent off)
#   CANDS="a=X=1 b=Y=1" bash scripts/device_persistent.sh cand
#                                            candidate builds (CANDS: NAME=DEF+DEF ...; the kernel's opening
#                                            comment says what each define does): the GPU tests of each candidate
#                                            (parallel processes), then the kernel bench of the default and every
#                                            candidate at b 8 and 64, the per-phase profile of the default and the
#                                            fastest at b 64; 60-95 s; a short table last; EXTRA_TESTS="a.py b.py":
#                                            more GPU test files, run beside the candidates' tests
export OMP_NUM_THREADS=4
O=${OUT:-/tmp}
if [ "$1" = cand ]; then
    [ -n "$CANDS" ] || { echo "device_persistent.sh cand: set CANDS (NAME=DEF+DEF ...)"; exit 1; }
    for c in $CANDS; do
        BYTEMAMBA_PERSISTENT_DEFINES=${c#*=} timeout 58 python3 -m pytest -q -m gpu tests/ops/test_persistent_step.py \
            -p no:cacheprovider > $O/tests_${c%%=*}.log 2>&1 &
    done
    # EXTRA_TESTS: more GPU test files run meanwhile (e.g. the launch helpers' other users)
    if [ -n "$EXTRA_TESTS" ]; then
        timeout 58 python3 -m pytest -q -m gpu $EXTRA_TESTS -p no:cacheprovider > $O/tests_extra.log 2>&1 &
    fi
    # meanwhile the bench's other builds into CuPy's kernel cache (default, and PROFILE=1 of every build)
    timeout 50 python3 -c "
import os, sys, torch
from bytemamba.ops import persistent_step as ps
for d in ['', 'PROFILE=1'] + ['PROFILE=1+' + c.split('=', 1)[1] for c in sys.argv[1:]]:
    os.environ['BYTEMAMBA_PERSISTENT_DEFINES'] = d
    ps.module(torch.device('cuda:0'), torch.bfloat16)
print('prewarm: compiled', 2 + len(sys.argv[1:]), 'builds')
" $CANDS > $O/prewarm.log 2>&1 &
    wait
    timeout 36 python3 scripts/bench_persistent_step.py --batches 8 64 --variants $CANDS --profile 64 \
        --profile-best --no-model > $O/kernel_$1.log 2>&1
    echo "bench exit status $? (124: timed out); prewarm: $(tail -1 $O/prewarm.log)"
    grep -i "failed\|error" $O/kernel_$1.log | head -5
    sed -n '/^profile, us a layer/,/^$/p' $O/kernel_$1.log
    echo "| build | defines | GPU tests (tests/ops/test_persistent_step.py -m gpu) |"
    echo "|---|---|---|"
    for c in $CANDS; do
        r=$(grep -E "passed|failed|error" $O/tests_${c%%=*}.log | tail -1)
        echo "| ${c%%=*} | ${c#*=} | ${r:-no summary (timed out at 58 s?)} |"
    done
    if [ -n "$EXTRA_TESTS" ]; then
        r=$(grep -E "passed|failed|error" $O/tests_extra.log | tail -1)
        echo "| extra | $EXTRA_TESTS | ${r:-no summary (timed out at 58 s?)} |"
    fi
    echo
    sed -n '/^| batch | what/,$p' $O/kernel_$1.log
    exit 0
fi
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
