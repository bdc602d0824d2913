#!/usr/bin/env bash
# Device run: Nsight Compute counters of the persistent decode-step kernel (byte353m, batch 64). Kernel replay of its
# cooperative cluster launch fails (LaunchFailed, 2026-11-29), so this replays the whole application once per pass
# (bench_persistent_step.py --launches 4 --batches 64; CuPy's on-disk kernel cache keeps later passes short) with a
# few sections only. On the lent H200 (session 8, 2026-11-29 19:18 UTC) that fails too: the kernel stops with
# CUDA_ERROR_ILLEGAL_INSTRUCTION under ncu (it runs clean without), so this script is kept to retry on another
# ncu / driver, not as a working profile (docs/PERF.md, "byte353m batch 64").
# Logs under $WORK (the device tool returns few files: session 7's run lost its ncu log to that), the details CSV and
# the logs' tails under $OUT; a summary prints last (with the ncu log's tail when ncu fails).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
OUT=${OUT:-/tmp/bytemamba_out}
WORK=${WORK:-/tmp/bytemamba_ncu_persistent}
mkdir -p "$OUT" "$WORK"
python3 scripts/bench_persistent_step.py --launches 4 --batches 64 > "$WORK/warm.log" 2>&1   # fills the kernel cache first
echo "warm-up rc $?"; tail -3 "$WORK/warm.log"
timeout -k 3 "${NCU_TIMEOUT:-400}" ncu --replay-mode application --clock-control none --section SpeedOfLight \
  --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section LaunchStats \
  -k persistent_step -s 3 -c 1 -o "$WORK/pers" python3 scripts/bench_persistent_step.py --launches 4 --batches 64 \
  > "$WORK/ncu.log" 2>&1
echo "ncu rc $?"; tail -15 "$WORK/ncu.log" | tee "$OUT/ncu_tail.txt"
ncu -i "$WORK/pers.ncu-rep" --page details --csv > "$OUT/pers_details.csv" 2> "$WORK/pers_details.err"
python3 - "$OUT/pers_details.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
if len(rows) < 2:
    sys.exit(print("no ncu rows"))
h = rows[0]
for r in rows[1:]:
    d = dict(zip(h, r))
    if d.get("Metric Value"):
        print(f"{d.get('Section Name', '')[:28]:28s} {d.get('Metric Name', '')[:48]:48s} {d.get('Metric Unit', ''):>10s} "
              f"{d['Metric Value']}")
PY
