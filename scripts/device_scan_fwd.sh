#!/usr/bin/env bash
# Device run for the scan forward's candidate builds (docs/PERF.md, "Selective scan", sessions 6 and 7): one call.
#   1. `bytemamba bench scan` of the default and every candidate in one process (forward + backward, 4 shapes);
#   2. the GPU tests of the default and each candidate build, in parallel (BYTEMAMBA_SCAN_DEFINES=<candidate>), in the
#      background while ncu runs (the bench's timings come first, on an idle GPU);
#   3. ncu counters of each build's ss_fwd at the main shape (time, L1 data-pipe wavefronts, MUFU, issue, warps).
#   CANDS="FWD_MINB=3 FWD_NTHR=64+FWD_MINB=4 FWD_CPT=1"   the candidates ('+' joins defines; "default", the launcher's
#   choice of build, is always added; these three force the 128-thread build, the 64-thread one, session 6's mapping)
# Logs under $OUT (t_<i>.log, bench.log, ncu_<i>.csv); a summary prints last.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
OUT=${OUT:-/tmp/bytemamba_out}
mkdir -p "$OUT"
CANDS=${CANDS:-"FWD_MINB=3 FWD_NTHR=64+FWD_MINB=4 FWD_CPT=1"}
PT="python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider tests/ops/test_scan_cuda.py"
variants=default
for c in $CANDS; do variants="$variants,$c"; done
timeout -k 3 "${BENCH_TIMEOUT:-300}" python3 -m bytemamba.bench scan --torch-max-gb 0 --variants "$variants" \
  > "$OUT/bench.log" 2>&1
i=0
for c in default $CANDS; do
  d=$c; [ "$c" = default ] && d=""
  ( BYTEMAMBA_SCAN_DEFINES=$d timeout -k 3 "${TEST_TIMEOUT:-240}" $PT > "$OUT/t_$i.log" 2>&1 ) &
  i=$((i + 1))
done
M=gpu__time_duration.sum,l1tex__data_pipe_lsu_wavefronts.avg.pct_of_peak_sustained_elapsed,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum
M=$M,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active
M=$M,sm__warps_active.avg.per_cycle_active,launch__registers_per_thread,launch__grid_size
i=0
for c in default $CANDS; do
  d=$c; [ "$c" = default ] && d=""
  BYTEMAMBA_SCAN_DEFINES=$d timeout -k 3 "${NCU_TIMEOUT:-50}" ncu --clock-control none --csv --page raw \
    -k regex:'^ss_fwd$' -s 1 -c 1 --metrics "$M" python3 scripts/profile_scan.py > "$OUT/ncu_$i.csv" 2> "$OUT/ncu_$i.err"
  i=$((i + 1))
done
wait
echo "## GPU tests (tests/ops/test_scan_cuda.py) per candidate"
i=0
for c in default $CANDS; do echo "$c: $(grep -E 'passed|failed|error' "$OUT/t_$i.log" | tail -1)"; i=$((i + 1)); done
echo "## bench scan"
grep -E "^\||variant|shape" "$OUT/bench.log" | tail -40
echo "## ncu ss_fwd (8, 2048, 8192, 16)"
i=0
for c in default $CANDS; do
  python3 - "$OUT/ncu_$i.csv" "$c" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if r]
hdr = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
if hdr is None:
    sys.exit(print(sys.argv[2], "no ncu rows"))
d = dict(zip(rows[hdr], rows[hdr + 2]))
short = {"gpu__time_duration.sum": "ns", "l1tex__data_pipe_lsu_wavefronts.avg.pct_of_peak_sustained_elapsed": "L1 pipe %",
         "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum": "shared wavefronts",
         "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active": "MUFU %",
         "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue %",
         "sm__warps_active.avg.per_cycle_active": "warps/SM", "launch__registers_per_thread": "regs",
         "launch__grid_size": "blocks"}
print(sys.argv[2], "|", " | ".join(f"{v} {d.get(k, '?')}" for k, v in short.items()))
PY
  i=$((i + 1))
done
