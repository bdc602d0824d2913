#!/usr/bin/env bash
# Device run for the fused one-kernel decode step (issue 7; cuda/decode_fused.cu). In one call:
#  1. a smoke step of every compile-time variant, in parallel, each under a timeout (a hang or a wrong result
#     drops that variant from the rest of the run);
#  2. the GPU tests of tests/ops/test_fused_step.py (failed variants deselected);
#  3. the kernel alone, every surviving variant (scripts/bench_fused_step.py), which names the fastest;
#  4. `bytemamba bench generate` at audio6m batch 1 and 8 with the fastest variant: fused step + fused sampler
#     (the default, with the Transformer and a per-kernel breakdown at batch 1), the same with programmatic
#     dependent launch (BYTEMAMBA_STEP_PDL=1), then fused step + PyTorch sampler (BYTEMAMBA_STEP_V2=0).
# Logs under $OUT (smoke.log, tests.log, kernel.log, bench*.log); the tables print last.
#
# MODE=rows: the many-row kernel (cuda/decode_fused_rows.cu) instead: the GPU tests of
# tests/ops/test_fused_step.py, the kernels alone per batch against the unfused step (bench_fused_step.py
# --batches: both builds r16 / r24, SSM_AT 0 and 1, no state traffic; per-phase profiles at batch 16 and 256),
# `bench generate` for audio6m with the defaults and with the cuBLAS step, the rows tests again with the variant
# $VARIANT (BYTEMAMBA_FUSED_DEFINES form, '+' for spaces), then tests/test_decode.py -x. Each stage under its own
# timeout (~235 s in all).
#
# MODE=cand: two candidates of the rows kernel (compile-time defines, '+' for spaces; default SSM_AT=1 and
# SSM_AT=0) against the defaults: $CAND's GPU tests in full (tests/ops/test_fused_step.py, tests/test_decode.py)
# and $ALT's rows tests forced at r16 and at r24 (in parallel), the kernels alone at $BATCHES (default 64 240
# 256): the defaults, each build, full tiles (SPREAD=0), $ALT, $CAND; `bench generate` at audio6m 64 / 240 / 256
# with $CAND (and the Transformer) and $ALT, then per-phase profiles at batch 256; tables last (~170 s).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bytemamba_out}
mkdir -p "$OUT"
if [ "${MODE:-}" = cand ]; then
  CAND=${CAND:-SSM_AT=1}; ALT=${ALT:-SSM_AT=0}
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/smoke.log"
  T="python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider"
  ( BYTEMAMBA_FUSED_DEFINES="${CAND//+/ }" timeout 95 $T tests/ops/test_fused_step.py tests/test_decode.py \
    > "$OUT/tests_cand.log" 2>&1 ) &
  for b in r16 r24; do
    ( BYTEMAMBA_FUSED_ROWS_VARIANT=$b BYTEMAMBA_FUSED_DEFINES="${ALT//+/ }" timeout 95 $T \
      tests/ops/test_fused_step.py -k "rows or model or graphs" > "$OUT/tests_alt_$b.log" 2>&1 ) &
  done
  wait
  echo "tests $CAND, test_fused_step + test_decode: $(tail -1 "$OUT/tests_cand.log")"
  for b in r16 r24; do echo "tests $ALT at $b: $(tail -1 "$OUT/tests_alt_$b.log")"; done
  timeout 50 python3 scripts/bench_fused_step.py --batches ${BATCHES:-64 240 256} --no-unfused --cluster-max 0 \
    --rows-variants r16 r24 full=SPREAD=0 alt=$ALT cand=$CAND > "$OUT/kernel.log" 2>&1
  G="python3 -m bytemamba.bench generate --no-profile --models audio6m --batches 64 240 256"
  [ $SECONDS -lt 140 ] && BYTEMAMBA_FUSED_DEFINES="${CAND//+/ }" timeout 30 $G > "$OUT/bench_cand.log" 2>&1
  [ $SECONDS -lt 158 ] && BYTEMAMBA_FUSED_DEFINES="${ALT//+/ }" timeout 18 $G --no-transformer \
    > "$OUT/bench_alt.log" 2>&1
  [ $SECONDS -lt 165 ] && timeout $((176 - SECONDS)) python3 scripts/bench_fused_step.py --batches 256 \
    --no-unfused --cluster-max 0 --profile 256 --profile-defines $CAND > "$OUT/profile.log" 2>&1
  echo "== profile"; grep -E "^\|" "$OUT/profile.log" | head -14
  echo "== bench generate: $CAND"; grep -E "^\|" "$OUT/bench_cand.log" | tail -4
  echo "== bench generate: $ALT"; grep -E "^\|" "$OUT/bench_alt.log" | tail -4
  echo "== kernel alone"; grep -E "^\|" "$OUT/kernel.log" | tail -5
  exit 0
fi
if [ "${MODE:-}" = rows ]; then
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/smoke.log"
  timeout 50 python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider tests/ops/test_fused_step.py 2>&1 \
    | tee "$OUT/tests.log" | tail -8
  timeout 85 python3 scripts/bench_fused_step.py --batches ${BATCHES:-1 8 16 32 64 128 256} --profile 16 256 \
    --profile-defines ${VARIANT:-SSM_AT=1} --rows-variants r16 r24 ssm0=SSM_AT=0 ssm1=SSM_AT=1 \
    nostate=NO_STATE_IO=1 2>&1 | tee "$OUT/kernel.log" | tail -34
  G="python3 -m bytemamba.bench generate --models audio6m --no-transformer --no-profile --new 512"
  timeout 35 $G --batches 1 8 16 64 128 256 2>&1 | tee "$OUT/bench.log" | grep -E "^\|" | tail -8
  timeout 25 $G --batches 64 256 --fused-max-batch 0 2>&1 | tee "$OUT/bench_cublas.log" \
    | grep -E "^\|" | tail -3
  BYTEMAMBA_FUSED_DEFINES="${VARIANT:-SSM_AT=1}" timeout 25 python3 -m pytest -q -m gpu --tb=short \
    -p no:cacheprovider tests/ops/test_fused_step.py -k rows 2>&1 | tee "$OUT/tests_variant.log" | tail -3
  [ $SECONDS -lt 215 ] && timeout $((234 - SECONDS)) python3 -m pytest -q -m gpu -x --tb=short -p no:cacheprovider \
    tests/test_decode.py 2>&1 | tee "$OUT/decode_tests.log" | tail -3
  exit 0
fi
VARIANTS=${VARIANTS:-"default= nodbl=DBL_ONCE=0 pack0=PACK=0+DBL_ONCE=0 pack2=PACK=2+DBL_ONCE=0 pack2dbl=PACK=2 cbar=SYNC_MODE=0+DBL_ONCE=0"}
SMOKE='
import torch
from tests.ops.test_fused_step import make_model, packed, random_states, rel
from bytemamba.ops.fused_step import fused_step_fn, fused_step_ref
m = make_model(n_layer=2, device="cuda"); W = packed(m, torch.bfloat16)
c1, c2 = random_states(m, 2, "cuda"), random_states(m, 2, "cuda")
ids = torch.tensor([5, 77], device="cuda")
for t in range(3):
    k = fused_step_fn(ids, W, [s.conv for s in c1.layers], [s.ssm for s in c1.layers])
    r = fused_step_ref(ids, W, [s.conv for s in c2.layers], [s.ssm for s in c2.layers])
torch.cuda.synchronize(); e = rel(k, r); print("smoke rel err", e); assert e < 3e-2
'
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/smoke.log"
for v in $VARIANTS; do
  n=${v%%=*}; d=${v#*=}
  ( BYTEMAMBA_FUSED_DEFINES="$d" timeout 60 python3 -c "$SMOKE" > "/tmp/smoke_$n.log" 2>&1; echo $? > "/tmp/rc_$n" ) &
done
wait
OK=""; DESEL=""; FIRST=""
for v in $VARIANTS; do
  n=${v%%=*}; d=${v#*=}
  echo "== $n ($d): rc $(cat /tmp/rc_$n)" >> "$OUT/smoke.log"; tail -3 "/tmp/smoke_$n.log" >> "$OUT/smoke.log"
  if [ "$(cat /tmp/rc_$n)" = 0 ]; then OK="$OK $v"; FIRST=${FIRST:-$d}; echo "smoke $n ok"
  else DESEL="$DESEL and not [$n-"; echo "smoke $n FAILED"; tail -3 "/tmp/smoke_$n.log"; fi
done
[ -z "$OK" ] && exit 1
export BYTEMAMBA_FUSED_DEFINES="$FIRST"
timeout 70 python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider tests/ops/test_fused_step.py \
  -k "not xxx $DESEL" 2>&1 | tee "$OUT/tests.log" | tail -12
timeout 50 python3 scripts/bench_fused_step.py $OK 2>&1 | tee "$OUT/kernel.log" | grep -v "us / step" | tail -16
BEST=$(grep "^BEST" "$OUT/kernel.log" | cut -d' ' -f3-)
[ -n "$(grep '^BEST' $OUT/kernel.log)" ] && export BYTEMAMBA_FUSED_DEFINES="$BEST"
echo "bench generate with BYTEMAMBA_FUSED_DEFINES='$BYTEMAMBA_FUSED_DEFINES'"
B="python3 -m bytemamba.bench generate --models audio6m --batches 1 8"
timeout 45 $B --breakdown audio6m:1 2>&1 | tee "$OUT/bench.log" | grep -E "^\||^#  " | tail -14
BYTEMAMBA_STEP_PDL=1 timeout 30 $B --no-transformer 2>&1 | tee "$OUT/bench_pdl.log" | tail -3
BYTEMAMBA_STEP_V2=0 timeout 30 $B --no-transformer 2>&1 | tee "$OUT/bench_torch.log" | tail -3
