"""Time the fused one-kernel decode steps alone (no sampler) on the audio6m shape: graph-replayed launches, CUDA
events, median of 15 repetitions of a graph of n launches.

    python3 scripts/bench_fused_step.py [NAME=DEFINE+DEFINE ...]
        the `cluster` kernel (cuda/decode_fused.cu): compile-time variants at batch 1 and 8, 1 or 15 layers (the
        slope is the cost of a layer, the intercept embedding + head + launch); the last line names the fastest
    python3 scripts/bench_fused_step.py --batches 1 8 16 64 128 256 [--rows-variants NAME=DEFINES|BUILD ...]
        per batch: the `cluster` kernel (batch <= --cluster-max), the `rows` kernel (cuda/decode_fused_rows.cu,
        each variant, 15 and 1 layers) and the model's unfused step (fused off: the tensor-core GEMM path where
        the model has one, and the cuBLAS path; --no-unfused skips it) in the same process; a per-phase clock64
        profile of the rows kernel (PROFILE=1, --profile BATCH ...); a table last. A rows variant is
        NAME=DEFINE+DEFINE or the name of a build in fused_step.ROWS_VARIANTS (e.g. r24: its defines)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bytemamba.bench_generate import graph_us  # noqa: E402
from bytemamba.config import ModelConfig  # noqa: E402
from bytemamba.models.lm import ByteMambaLM  # noqa: E402
from bytemamba.ops.fused_step import (ROWS_VARIANTS, fused_step_fn, max_active_clusters, rows_module,  # noqa: E402
                                      rows_variant)

PHASES = ["N norm", "I in_proj", "C conv", "X mma+send", "X wait+sum", "(x_proj copy)", "D dt+state", "O out_proj",
          "R residual", "head"]


def timed(fn, n=200, reps=15):
    """us per call of fn, n calls in one CUDA graph (bench_generate.graph_us)."""
    return graph_us(lambda i: fn(), n, reps)


def layers_of(W, L):
    return dataclasses.replace(W, rows=None, **{f.name: getattr(W, f.name)[:L] for f in dataclasses.fields(W)
                                                if f.name in ("W_in", "conv_w", "conv_b", "W_x", "W_dt", "dt_b",
                                                              "A", "D", "W_out")})


def states(m, batch):
    cache = m.empty_cache(batch, "cuda")
    for s in cache.layers:
        s.conv.normal_()
        s.ssm.normal_()
    return cache


def cluster_variants(m, W, variants):
    rows = []
    for name, defines in variants:
        os.environ["BYTEMAMBA_FUSED_DEFINES"] = defines
        for batch in (1, 8):
            cache = states(m, batch)
            ids = torch.randint(0, 256, (batch,), device="cuda")
            logits = torch.empty(batch, 256, device="cuda")
            for L in (15, 1):
                Wl = layers_of(W, L)
                conv = [s.conv for s in cache.layers[:L]]
                ssm = [s.ssm for s in cache.layers[:L]]
                us = timed(lambda: fused_step_fn(ids, Wl, conv, ssm, logits, kernel="cluster"))
                assert torch.isfinite(logits).all()
                rows.append((name, batch, L, us))
                print(f"{name} ({defines or 'defaults'}) batch {batch} layers {L:2d}: {us:7.2f} us / step", flush=True)
    os.environ["BYTEMAMBA_FUSED_DEFINES"] = ""
    print("\n| variant | defines | batch | us / step, 15 layers (kernel only) | 1 layer | per layer (slope) |")
    print("|---|---|---|---|---|---|")
    for name, defines in variants:
        for batch in (1, 8):
            t = {r[2]: r[3] for r in rows if r[:2] == (name, batch)}
            print(f"| {name} | {defines or '-'} | {batch} | {t[15]:.2f} | {t[1]:.2f} | {(t[15] - t[1]) / 14:.2f} |")
    best = min((r for r in rows if r[1] == 1 and r[2] == 15), key=lambda r: r[3])
    print(f"BEST {best[0]} {dict(variants)[best[0]]}")


def profile_rows(W, cache, ids, logits, defines="", steps=20):
    """Per-phase clock64 deltas of one thread (CTA 0 of cluster 0), us per step, from the PROFILE=1 build."""
    import cupy
    use_variant("", f"PROFILE=1+{defines.replace(' ', '+')}")
    conv, ssm = [s.conv for s in cache.layers], [s.ssm for s in cache.layers]
    fused_step_fn(ids, W, conv, ssm, logits, kernel="rows")
    K = rows_module(ids.device, W.dtype, rows_variant(ids.shape[0], max_active_clusters(ids.device, W.dtype)))
    out = cupy.zeros(16, dtype=cupy.int64)
    K["fused_rows_prof"]((1,), (32,), (out,))                  # zero it
    for _ in range(steps):
        fused_step_fn(ids, W, conv, ssm, logits, kernel="rows")
    torch.cuda.synchronize()
    K["fused_rows_prof"]((1,), (32,), (out,))
    cupy.cuda.runtime.deviceSynchronize()
    use_variant("", "")
    ghz = 1.98                                                # the H200's SM clock under load (docs/PERF.md)
    return [int(v) / steps / (ghz * 1e3) for v in out.get()[:len(PHASES)]], ghz


def rows_variant_arg(v):
    """A build name of ROWS_VARIANTS (that build at every batch), or NAME=DEFINE+DEFINE (the build the launcher
    picks for the batch, plus these defines) -> [name, build or "", defines]."""
    if "=" in v:
        return [*v.split("=", 1)[:1], "", v.split("=", 1)[1]]
    if v not in ROWS_VARIANTS:
        raise SystemExit(f"--rows-variants: {v!r} is neither NAME=DEFINES nor a build ({', '.join(ROWS_VARIANTS)})")
    return [v, v, ""]


def use_variant(build, defines):
    """Select a rows-kernel variant for the launcher (through its environment knobs; the token SPREAD=0 among
    the defines sets BYTEMAMBA_FUSED_SPREAD=0: full tiles instead of the launcher's spread of the rows over every
    cluster)."""
    os.environ["BYTEMAMBA_FUSED_ROWS_VARIANT"] = build
    os.environ["BYTEMAMBA_FUSED_DEFINES"] = defines.replace("+", " ")
    os.environ["BYTEMAMBA_FUSED_SPREAD"] = "0" if "SPREAD=0" in defines.split("+") else "1"


def batches_table(m, W, args):
    variants = [["rows", "", ""]] + [rows_variant_arg(v) for v in args.rows_variants]
    for name, build, defines in variants:
        use_variant(build, defines)
        rows = rows_module(torch.device("cuda"), W.dtype)["rows"] if build else "by batch"
        print(f"rows kernel {name} ({build or 'auto'} {defines}): {rows} rows a cluster, max active clusters "
              f"{max_active_clusters(torch.device('cuda'))}", flush=True)
    use_variant("", "")
    res = {}
    for batch in args.batches:
        cache = states(m, batch)
        ids = torch.randint(0, 256, (batch,), device="cuda")
        logits = torch.empty(batch, 256, device="cuda")
        conv, ssm = [s.conv for s in cache.layers], [s.ssm for s in cache.layers]
        if batch <= args.cluster_max:
            res[batch, "cluster"] = timed(lambda: fused_step_fn(ids, W, conv, ssm, logits, kernel="cluster"))
        for name, build, defines in variants:
            use_variant(build, defines)
            for L in (15, 1) if name == "rows" else (15,):
                Wl = layers_of(W, L) if L == 1 else W
                us = timed(lambda: fused_step_fn(ids, Wl, conv[:L], ssm[:L], logits, kernel="rows"))
                assert torch.isfinite(logits).all()
                res[batch, name if L == 15 else name + "/1"] = us
        use_variant("", "")
        if args.unfused:                                        # the multi-launch step (cuBLAS path) it replaces
            m.fused_max_batch = 0
            c2 = states(m, batch)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                res[batch, "cublas"] = timed(lambda: m.step(ids, c2), n=50)
            res[batch, "cublas:path"] = m.last_step_path
        print(batch, {k[1]: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items() if k[0] == batch},
              flush=True)
    profs = []
    for b in args.profile:
        for pd in [""] + args.profile_defines:
            cache = states(m, b)
            ids = torch.randint(0, 256, (b,), device="cuda")
            prof, ghz = profile_rows(W, cache, ids, torch.empty(b, 256, device="cuda"), pd.replace("+", " "))
            profs.append((f"b {b}" + (f" {pd}" if pd else ""), prof))
    if profs:
        print(f"\nrows kernel, 15 layers: clock64 per phase, thread 0 of CTA 0 of cluster 0 (waits included; "
              f"{ghz:.2f} GHz assumed), us per layer")
        print("| phase | " + " | ".join(p[0] for p in profs) + " |")
        print("|---" * (1 + len(profs)) + "|")
        for i, name in enumerate(PHASES):
            print(f"| {name} | " + " | ".join(f"{p[1][i] / 15:.3f}" for p in profs) + " |")
        print("| total per step (us) | " + " | ".join(f"{sum(p[1]):.2f}" for p in profs) + " |")
    cols = [v[0] for v in variants]
    valid = ["cluster"] + [v[0] for v in variants if "NO_STATE_IO=1" not in v[2].split("+")]   # (wrong results)
    print("\n| batch | cluster kernel us | rows us (15 layers) | rows 1 layer | "
          + " | ".join(f"{c} us" for c in cols[1:])
          + (" | unfused cuBLAS us" if args.unfused else "") + " | best fused samples/s"
          + (" | vs cuBLAS step |" if args.unfused else " |"))
    print("|---" * (4 + len(cols) + 2 * args.unfused) + "|")
    for batch in args.batches:
        best = min(res[batch, k] for k in valid if (batch, k) in res)
        line = [str(batch), f"{res[batch, 'cluster']:.2f}" if (batch, "cluster") in res else "-"]
        line += [f"{res[batch, 'rows']:.2f} | {res[batch, 'rows/1']:.2f}"] + [f"{res[batch, c]:.2f}" for c in cols[1:]]
        if args.unfused:
            cub = res[batch, "cublas"]
            line += [f"{cub:.2f} ({res[batch, 'cublas:path']})"]
        line += [f"{batch / best * 1e6:,.0f}"] + ([f"{cub / best:.2f}x"] if args.unfused else [])
        print("| " + " | ".join(line) + " |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("variants", nargs="*", help="NAME=DEFINES variants of the cluster kernel")
    p.add_argument("--batches", nargs="*", type=int, default=None)
    p.add_argument("--rows-variants", nargs="*", default=[],
                   help="NAME=DEFINE+DEFINE of the rows kernel, or a build name (fused_step.ROWS_VARIANTS)")
    p.add_argument("--cluster-max", type=int, default=32)
    p.add_argument("--profile", nargs="*", type=int, default=[], help="batches to profile the rows kernel at")
    p.add_argument("--profile-defines", nargs="*", default=[], help="more rows variants to profile (DEF+DEF)")
    p.add_argument("--no-unfused", dest="unfused", action="store_false", help="skip the model's unfused step")
    args = p.parse_args()
    torch.manual_seed(0)
    m = ByteMambaLM(ModelConfig(d_model=256, n_layer=15, scan_backend="cuda")).cuda().eval()
    W = m._fused_weights(torch.bfloat16)
    if args.batches:
        batches_table(m, W, args)
    else:
        cluster_variants(m, W, [a.split("=", 1) for a in args.variants]
                         or [["default", ""], ["cbar", "SYNC_MODE=0+DBL_ONCE=0"]])


if __name__ == "__main__":
    main()
