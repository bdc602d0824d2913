"""Micro-benchmark of the tensor-core step GEMM (bytemamba/ops/gemm.py) per projection shape, beside cuBLAS.

    python3 scripts/bench_gemm_step.py [--reps 20] [--out FILE]

For every shape (the projections of byte353m and audio6m at their decode batches) and launch plan (the default,
then forced BYTEMAMBA_GEMM_TUNE plans): `reps` launches captured in one CUDA graph, replayed 15 times, CUDA events
around each replay; the median / reps is the time of one launch, back to back (so with PDL on, consecutive
launches overlap the way a decode step's kernels do). cuBLAS: F.linear on the same shapes, the same way; for
in_proj also the unfused sequence the cuBLAS path runs (add_rmsnorm + F.linear + conv_step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from bytemamba.ops.gemm import gemm_fn, plan
from bytemamba.ops.step import add_rmsnorm_fn, conv_state_update_fn

# name, N, K, batch, kind (norm+conv | plain | resid | head), forced plans to try beside the default
SHAPES = [
    ("byte353m in_proj", 4096, 1024, 64, "normconv", ["epi=0", "wm=8,wk=1,s=8", "wm=8,wk=1,s=2", "wm=4,wk=2,s=4",
                                                       "wm=4,wk=1,s=8", "wm=4,wk=2,s=8"]),
    ("byte353m x_proj", 96, 2048, 64, "plain", ["epi=0", "wm=2,wk=4,s=8", "wm=6,wk=1,s=8", "wm=3,wk=2,s=8",
                                                 "wm=1,wk=8,s=8", "wm=2,wk=2,s=8"]),
    ("byte353m out_proj", 1024, 2048, 64, "resid", ["epi=0", "wm=8,wk=1,s=8", "wm=4,wk=2,s=8", "wm=2,wk=2,s=8",
                                                     "wm=4,wk=2,s=4", "wm=2,wk=4,s=8"]),
    ("byte353m head", 256, 1024, 64, "head", ["wm=4,wk=2,s=4", "wm=2,wk=4,s=4"]),
    ("byte353m in_proj", 4096, 1024, 8, "normconv", ["wm=8,wk=1,s=4", "wm=4,wk=2,s=4", "wm=2,wk=4,s=2"]),
    ("byte353m x_proj", 96, 2048, 8, "plain", ["wm=2,wk=4,s=8"]),
    ("byte353m out_proj", 1024, 2048, 8, "resid", ["wm=4,wk=1,s=8", "wm=2,wk=4,s=8", "wm=4,wk=2,s=4"]),
    ("byte353m head", 256, 1024, 8, "head", ["wm=2,wk=4,s=4"]),
    ("byte353m in_proj", 4096, 1024, 256, "normconv", ["wm=8,wk=1,s=8", "wm=4,wk=2,s=4", "wm=4,wk=1,s=4"]),
    ("byte353m x_proj", 96, 2048, 256, "plain", ["wm=2,wk=4,s=8", "wm=6,wk=1,s=8"]),
    ("byte353m out_proj", 1024, 2048, 256, "resid", ["wm=4,wk=2,s=8", "wm=4,wk=1,s=8"]),
    ("byte353m head", 256, 1024, 256, "head", ["wm=4,wk=2,s=4"]),
    ("audio6m in_proj", 1024, 256, 256, "normconv", ["wm=4,wk=1,s=8", "wm=8,wk=1,s=8", "wm=4,wk=2,s=4",
                                                      "wm=8,wk=1,s=2"]),
    ("audio6m x_proj", 48, 512, 256, "plain", ["wm=3,wk=2,s=8", "wm=1,wk=2,s=8", "wm=3,wk=1,s=4"]),
    ("audio6m out_proj", 256, 512, 256, "resid", ["wm=2,wk=2,s=8", "wm=4,wk=2,s=4", "wm=8,wk=1,s=8"]),
    ("audio6m head", 256, 256, 256, "head", ["wm=4,wk=1,s=4", "wm=2,wk=2,s=4"]),
    ("audio6m in_proj", 1024, 256, 64, "normconv", ["wm=4,wk=1,s=8", "wm=4,wk=2,s=4"]),
    ("audio6m x_proj", 48, 512, 64, "plain", ["wm=3,wk=2,s=8", "wm=3,wk=1,s=4"]),
    ("audio6m out_proj", 256, 512, 64, "resid", ["wm=2,wk=2,s=8", "wm=4,wk=2,s=4"]),
    ("audio6m head", 256, 256, 64, "head", ["wm=4,wk=1,s=4", "wm=2,wk=2,s=4"]),
]


def graph_us(fn, reps: int) -> float:
    """One launch of fn, in microseconds: reps launches in a graph, median of 15 timed replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / reps)
    return statistics.median(times)


def bench_shape(name, N, K, b, kind, tunes, reps, dt=torch.bfloat16):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(N + K + b)
    r = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
    W = (r(N, K) * K ** -0.5).to(dt)
    x = r(b, K).to(dt)
    res = r(b, K)
    partial = res.pow(2).sum(1, keepdim=True)
    nw = r(K)
    e = N // 2
    cst, cw, cb = r(b, e, 3), r(e, 4), r(e)
    res_out = r(b, N)
    if kind == "normconv":
        fn = lambda: gemm_fn(W, norm=(res, partial, nw, 1e-5), conv=(cst, cw, cb))  # noqa: E731
    elif kind == "head":
        fn = lambda: gemm_fn(W, norm=(res, partial, nw, 1e-5), out_f32=True)  # noqa: E731
    elif kind == "resid":
        fn = lambda: gemm_fn(W, x, resid=res_out)  # noqa: E731
    else:
        fn = lambda: gemm_fn(W, x)  # noqa: E731
    rows = []
    cublas = graph_us(lambda: F.linear(x, W), reps)
    unfused = None
    if kind == "normconv":
        def seq():
            h = add_rmsnorm_fn(res, None, nw, 1e-5, dt)
            xz = F.linear(h, W)
            conv_state_update_fn(xz[:, :e], cst, cw, cb)
        unfused = graph_us(seq, reps)
    for tune in [""] + tunes:
        os.environ["BYTEMAMBA_GEMM_TUNE"] = tune
        try:
            p = plan(N, K, b, kind in ("normconv", "head"), kind == "resid")
            us = graph_us(fn, reps)
        except Exception as exc:                        # a plan that does not fit: say so, go on
            rows.append((name, f"{N}x{K}", b, kind, tune or "default", "-", f"{type(exc).__name__}: {exc}"[:60],
                         cublas, unfused, None))
            continue
        finally:
            os.environ.pop("BYTEMAMBA_GEMM_TUNE", None)
        pl = f"wm{p['wm']} wk{p['wk']} s{p['s']} nt{p['nt']} z{p['zb']} ({p['ctas']} CTAs) epi{p['epi']}"
        rows.append((name, f"{N}x{K}", b, kind, tune or "default", pl, us, cublas, unfused, cublas / us))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="", help="substring of the shape names to run")
    ap.add_argument("--plans-out", default=None,
                    help="write the fastest plan per shape as a BYTEMAMBA_GEMM_PLANS file (JSON)")
    a = ap.parse_args()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, PDL env "
          f"{os.environ.get('BYTEMAMBA_STEP_PDL', '(default: off above batch 1)')}", flush=True)
    lines = ["| shape | N x K | batch | kind | forced | plan | us | cuBLAS F.linear us | unfused cuBLAS-path us | "
             "cuBLAS / gemm |", "|---|---|---|---|---|---|---|---|---|---|"]
    best = {}
    for name, N, K, b, kind, tunes in SHAPES:
        if a.only and a.only not in name:
            continue
        rows = bench_shape(name, N, K, b, kind, tunes, a.reps)
        timed = [r for r in rows if isinstance(r[6], float)]
        if timed:
            win = min(timed, key=lambda r: r[6])
            p = win[5].split()                           # "wm8 wk1 s4 nt8 ..." -> the plan items
            key = f"{N},{K},{b},{int(kind in ('normconv', 'head'))},{int(kind == 'resid')}"
            epi = "0" if "epi=0" in win[4] else "1"
            best[key] = f"wm={p[0][2:]},wk={p[1][2:]},s={p[2][1:]},epi={epi}"
            rows.append((name, f"{N}x{K}", b, kind, "fastest", best[key], win[6], win[7], win[8], win[9]))
        for row in rows:
            name_, shape, bb, kd, tune, pl, us, cub, unf, ratio = row
            f = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
            line = f"| {name_} | {shape} | {bb} | {kd} | {tune} | {pl} | {f(us)} | {f(cub)} | {f(unf)} | {f(ratio)} |"
            lines.append(line)
            print(line, flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    if a.plans_out:
        import json
        with open(a.plans_out, "w") as fh:
            json.dump(best, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
