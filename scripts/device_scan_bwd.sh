#!/usr/bin/env bash
# Device run for the scan backward (cuda/scan_bwd.cu, v6), one call: the GPU tests of tests/ops/test_scan_cuda.py
# with the default builds, `bench scan` of the default against the candidate builds in $VARIANTS
# (forced at every shape), then Nsight Compute counters of scan_bwd at the main shape (NCU=0 skips them).
# Logs under $OUT; the bench table prints last.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bytemamba_out}
mkdir -p "$OUT"
VARIANTS=${VARIANTS:-default}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader > "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-75}" python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider tests/ops/test_scan_cuda.py \
  > "$OUT/tests.log" 2>&1
timeout "${BENCH_TIMEOUT:-60}" python3 -m bytemamba.bench scan --deterministic --torch-max-gb 0 --variants "$VARIANTS" \
  > "$OUT/bench.log" 2>&1
if [ "${NCU:-1}" = 1 ]; then
  M=gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active
  M=$M,launch__registers_per_thread,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed.sum
  M=$M,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active
  for r in long_scoreboard short_scoreboard wait barrier mio_throttle math_pipe_throttle not_selected lg_throttle \
           no_instruction dispatch_stall membar; do
    M=$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio; done
  PYTHONPATH=. timeout "${NCU_TIMEOUT:-40}" ncu --clock-control none --csv --page raw -k regex:"scan_bwd$" -c 1 \
    --metrics $M python3 scripts/profile_scan.py > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
  python3 - "$OUT/ncu.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if r]
hdr = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
if hdr is None:
    sys.exit(print("ncu: no rows"))
h = rows[hdr]
for r in rows[hdr + 2:]:
    d = dict(zip(h, r))
    print("ncu", d.get("Kernel Name", "?")[:30],
          {k.replace("smsp__average_warps_issue_stalled_", "st_").replace("_per_issue_active.ratio", "")
            .replace(".avg.pct_of_peak_sustained_active", "%"): v
           for k, v in d.items() if k.startswith(("smsp", "sm__", "gpu__", "l1tex", "launch__reg"))})
PY
fi
tail -1 "$OUT/tests.log"
grep "^|" "$OUT/bench.log" | cut -d'|' -f2-5
