#!/usr/bin/env bash
# Device run: Nsight Compute counters of the kernels that miss their bars (what limits them), one call.
#  1. the CUDA scan at the main shape (fwd + bwd): scripts/device_scan.sh with NCU=1 (tests skipped, a short bench)
#  2. the decode step's ssm_step and gemv/cuBLAS kernels inside the graph replays of `bench generate`
#     (byte353m batch 64 and audio6m batch 256), then byte353m batch 8 with and without PDL (not yet timed).
# Logs and CSVs under $OUT; summaries print last.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bytemamba_out}
mkdir -p "$OUT"
if [ "${SKIP_SCAN:-0}" != 1 ]; then
  NCU=1 SKIP_TESTS=1 BENCH_TIMEOUT=90 bash scripts/device_scan.sh --shapes 8,2048,8192,16 --iters 20 \
    2>&1 | tail -4
fi
M=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active
M=$M,smsp__issue_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size,launch__block_size
for r in long_scoreboard short_scoreboard wait barrier lg_throttle membar no_instruction math_pipe_throttle; do
  M=$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio; done
for cfg in byte353m:64 audio6m:256; do
  m=${cfg%%:*}; b=${cfg##*:}
  timeout 150 ncu --clock-control none --csv --page raw -k regex:"ssm_step|conv_step|add_rmsnorm" --launch-skip 3 -c 3 --metrics $M \
    python3 -m bytemamba.bench generate --models $m --batches $b --no-transformer --no-profile --prompt 128 --new 64 \
    > "$OUT/ncu_$m$b.csv" 2> "$OUT/ncu_$m$b.err"
  python3 - "$OUT/ncu_$m$b.csv" "$cfg" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if r]
hdr = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
if hdr is None:
    sys.exit(print(sys.argv[2], "no ncu rows"))
h = rows[hdr]
for r in rows[hdr + 2:]:
    d = dict(zip(h, r))
    print(sys.argv[2], d.get("Kernel Name", "?")[:40],
          {k.replace("smsp__average_warps_issue_stalled_", "st_").replace("_per_issue_active.ratio", "")
            .replace(".avg.pct_of_peak_sustained_active", "%").replace(".avg.pct_of_peak_sustained_elapsed", "%"): v
           for k, v in d.items() if k.startswith(("smsp", "sm__", "gpu__", "dram", "launch"))})
PY
done
for pdl in 0 1; do
  BYTEMAMBA_STEP_PDL=$pdl timeout 90 python3 -m bytemamba.bench generate --models byte353m --batches 8 \
    --no-transformer --no-profile 2>&1 | grep "mamba b=8" | sed "s/^/PDL=$pdl /"
done
