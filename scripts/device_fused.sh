#!/usr/bin/env bash
# Device run for the fused one-kernel decode step (issue 7; cuda/decode_fused.cu): a smoke step per
# synchronisation mode (a hang or a wrong result in one mode switches the rest of the run to the other),
# the GPU tests of tests/ops/test_fused_step.py, the kernel alone (scripts/bench_fused_step.py), then
# `bytemamba bench generate` at audio6m batch 1 and 8: fused step + PyTorch sampler (with the Transformer),
# fused step + fused sampler (BYTEMAMBA_STEP_V2=1), and the unfused GEMV / cuBLAS path (--fused-max-batch 0).
# Logs under $OUT; the tables print last.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bytemamba_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
SMOKE='
import torch
from tests.ops.test_fused_step import make_model, packed, random_states, rel
from bytemamba.ops.fused_step import fused_step_fn, fused_step_ref
m = make_model(n_layer=2, device="cuda"); W = packed(m, torch.bfloat16)
c1, c2 = random_states(m, 2, "cuda"), random_states(m, 2, "cuda")
ids = torch.tensor([5, 77], device="cuda")
k = fused_step_fn(ids, W, [s.conv for s in c1.layers], [s.ssm for s in c1.layers])
r = fused_step_ref(ids, W, [s.conv for s in c2.layers], [s.ssm for s in c2.layers])
torch.cuda.synchronize(); e = rel(k, r); print("smoke rel err", e); assert e < 3e-2
'
GOOD=""
for m in 1 0; do
  if BYTEMAMBA_FUSED_DEFINES=SYNC_MODE=$m timeout 40 python3 -c "$SMOKE" > "$OUT/smoke$m.log" 2>&1; then
    GOOD=${GOOD:-$m}; echo "smoke SYNC_MODE=$m ok: $(tail -1 $OUT/smoke$m.log)"
  else echo "smoke SYNC_MODE=$m FAILED:"; tail -5 "$OUT/smoke$m.log"; fi
done
[ -n "$GOOD" ] && export BYTEMAMBA_FUSED_DEFINES=SYNC_MODE=$GOOD
echo "using SYNC_MODE=$GOOD"
timeout ${TEST_TIMEOUT:-60} python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider tests/ops/test_fused_step.py \
  2>&1 | tee "$OUT/tests.log" | tail -15
[ -z "$GOOD" ] && exit 1
[ "$GOOD" = 1 ] && timeout 40 python3 scripts/bench_fused_step.py 2>&1 | tee "$OUT/kernel.log" | tail -14
B="python3 -m bytemamba.bench generate --models audio6m --batches 1 8"
timeout 45 $B 2>&1 | tee "$OUT/bench_fused.log" | tail -6
BYTEMAMBA_STEP_V2=1 timeout 30 $B --no-transformer 2>&1 | tee "$OUT/bench_fused_v2.log" | tail -4
timeout 30 $B --no-transformer --fused-max-batch 0 2>&1 | tee "$OUT/bench_unfused.log" | tail -4
