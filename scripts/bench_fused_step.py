"""Time the fused one-kernel decode step alone (cuda/decode_fused.cu, no sampler) on the audio6m shape:
graph-replayed launches, CUDA events, median of 15 repetitions of 200 launches. Variants: compile-time
defines (argv, see the opening of cuda/decode_fused.cu), batch 1 and 8, and 1 or 15 layers (the slope is the
cost of a layer, the intercept embedding + head + launch). Usage:
    python3 scripts/bench_fused_step.py [NAME=DEFINE+DEFINE ...]
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bytemamba.config import ModelConfig  # noqa: E402
from bytemamba.models.lm import ByteMambaLM  # noqa: E402
from bytemamba.ops.fused_step import fused_step_fn  # noqa: E402


def timed(fn, n=200, reps=15):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1e3 / n)
    return statistics.median(out)


def main():
    """argv: NAME=DEFINES variants (defines joined by '+', e.g. pack2=PACK=2+DBL_ONCE=1); default: the
    transaction-barrier and the cluster-barrier modes. The last line names the fastest at batch 1, 15 layers."""
    variants = [a.split("=", 1) for a in sys.argv[1:]] or [["default", ""], ["cbar", "SYNC_MODE=0+DBL_ONCE=0"]]
    torch.manual_seed(0)
    m = ByteMambaLM(ModelConfig(d_model=256, n_layer=15)).cuda().eval()
    W = m._fused_weights(torch.bfloat16)
    rows = []
    for name, defines in variants:
        os.environ["BYTEMAMBA_FUSED_DEFINES"] = defines
        for batch in (1, 8):
            cache = m.empty_cache(batch, "cuda")
            for s in cache.layers:
                s.conv.normal_()
                s.ssm.normal_()
            ids = torch.randint(0, 256, (batch,), device="cuda")
            logits = torch.empty(batch, 256, device="cuda")
            for L in (15, 1):
                Wl = dataclasses.replace(W, **{f.name: getattr(W, f.name)[:L] for f in dataclasses.fields(W)
                                               if f.name in ("W_in", "conv_w", "conv_b", "W_x", "W_dt", "dt_b",
                                                             "A", "D", "W_out")})
                conv = [s.conv for s in cache.layers[:L]]
                ssm = [s.ssm for s in cache.layers[:L]]
                us = timed(lambda: fused_step_fn(ids, Wl, conv, ssm, logits))
                assert torch.isfinite(logits).all()
                rows.append((name, batch, L, us))
                print(f"{name} ({defines or 'defaults'}) batch {batch} layers {L:2d}: {us:7.2f} us / step", flush=True)
    print("\n| variant | defines | batch | us / step, 15 layers (kernel only) | 1 layer | per layer (slope) |")
    print("|---|---|---|---|---|---|")
    for name, defines in variants:
        for batch in (1, 8):
            t = {r[2]: r[3] for r in rows if r[:2] == (name, batch)}
            print(f"| {name} | {defines or '-'} | {batch} | {t[15]:.2f} | {t[1]:.2f} | {(t[15] - t[1]) / 14:.2f} |")
    best = min((r for r in rows if r[1] == 1 and r[2] == 15), key=lambda r: r[3])
    print(f"BEST {best[0]} {dict(variants)[best[0]]}")


if __name__ == "__main__":
    main()
