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
if [ "${NCU:-0}" = 1 ]; then
  M=smsp__issue_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
  for r in barrier long_scoreboard short_scoreboard math_pipe_throttle mio_throttle wait not_selected selected no_instruction dispatch_stall lg_throttle branch_resolving; do
    M=$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio; done
  PYTHONPATH=. ncu --clock-control none --csv --page raw -k regex:"ss_(fwd|bwd)$" -c 2 --metrics $M \
    python3 scripts/profile_scan.py > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
  python3 - "$OUT/ncu.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if r]
hdr = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
h = rows[hdr]
for r in rows[hdr + 2:]:
    d = dict(zip(h, r))
    print(d.get("Kernel Name"), {k.replace("smsp__average_warps_issue_stalled_", "stall_").replace("_per_issue_active.ratio", ""): v
                                 for k, v in d.items() if k.startswith(("smsp", "sm__", "gpu__", "dram"))})
PY
fi
