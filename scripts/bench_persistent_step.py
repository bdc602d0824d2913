"""Time the persistent one-kernel step (cuda/decode_persistent.cu) on the byte353m shape: the kernel alone (every
layer, no final norm / head), graph-replayed (bench_generate.graph_us: n launches in one CUDA graph, median of
replays), at 53 layers and 1 layer (the slope is the cost of a layer); the model's whole step (graph) on the
persistent path and on today's cuBLAS path; a per-phase clock64 profile (PROFILE=1 build). Table last.

    python3 scripts/bench_persistent_step.py --batches 8 64 [--variants NAME=DEF+DEF ...] [--profile 64]
        [--profile-best]      (profile only the default and the fastest variant at each --profile batch)
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
from bytemamba.ops import persistent_step as ps  # noqa: E402

PHASES = ["P1 in_proj+conv+x_proj", "B2", "P2 x_proj reduce", "B3", "P3 dt+state+y", "B4", "P4 out_proj+resid", "B1"]
# the phases' parts (the kernel's slots 8..20 and the rest of each phase), as (name, slots summed)
PARTS = [("P1 start", (19,)), ("P1 Wi wait", (20,)), ("P1 G+mma", (8,)), ("P1 st+xz", (9,)), ("P1 conv", (10,)),
         ("P1 x_proj", (0,)), ("P3 dbl", (11,)), ("P3 st wait", (12,)), ("P3 math", (13,)), ("P3 sync", (14,)),
         ("P3 Y", (4,)), ("P4 Y+mma", (15,)), ("P4 resid", (6,))]
GHZ = 1.98


def layers_of(W, P, L):
    Wl = dataclasses.replace(W, rows=None, **{f.name: getattr(W, f.name)[:L] for f in dataclasses.fields(W)
                                              if f.name in ("W_in", "conv_w", "conv_b", "W_x", "W_dt", "dt_b",
                                                            "A", "D", "W_out")})
    Pl = dataclasses.replace(P, Wi=P.Wi[:L], Wo=P.Wo[:L], Wx=P.Wx[:L], C=P.C[:L])
    return Wl, Pl


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", nargs="*", type=int, default=[8, 64])
    p.add_argument("--variants", nargs="*", default=[], help="NAME=DEF+DEF builds besides the default")
    p.add_argument("--profile", nargs="*", type=int, default=[], help="batches to profile (PROFILE=1 build)")
    p.add_argument("--profile-best", action="store_true",
                   help="profile only the default and the fastest variant (53 layers) at each --profile batch")
    p.add_argument("--layers", type=int, default=53)
    p.add_argument("--no-model", dest="model", action="store_false", help="skip the model-step comparison")
    p.add_argument("--launches", type=int, default=0,
                   help="only launch the default build this many times at the first batch, then exit (for ncu: "
                        "scripts/device_ncu_persistent.sh)")
    a = p.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = ByteMambaLM(ModelConfig(d_model=1024, n_layer=a.layers)).eval()
    dt = torch.bfloat16
    W = m._fused_weights(dt)
    P = ps.pack_persistent(W)
    variants = [("default", "")] + [tuple(v.split("=", 1)) for v in a.variants]
    rows, profiles = [], []
    for b in a.batches:
        cache = m.empty_cache(b, "cuda")
        for s in cache.layers:
            s.conv.normal_()
            s.ssm.normal_().mul_(0.1)
        ids = torch.randint(0, 256, (b,), device="cuda")
        res = torch.empty(b, 1024, device="cuda")
        if a.launches:
            conv, ssm = [s.conv for s in cache.layers], [s.ssm for s in cache.layers]
            for _ in range(a.launches):
                ps.persistent_layers_fn(ids, P, W, conv, ssm, res)
            torch.cuda.synchronize()
            assert torch.isfinite(res).all()
            print(f"{a.launches} launches at batch {b}, {a.layers} layers")
            return
        for name, defines in variants:
            os.environ["BYTEMAMBA_PERSISTENT_DEFINES"] = defines
            t = {}
            try:
                for L in (a.layers, 1):
                    Wl, Pl = layers_of(W, P, L)
                    conv, ssm = [s.conv for s in cache.layers[:L]], [s.ssm for s in cache.layers[:L]]
                    t[L] = graph_us(lambda i: ps.persistent_layers_fn(ids, Pl, Wl, conv, ssm, res), 20, 10)
                    assert torch.isfinite(res).all()
            except Exception as exc:                    # (one build failing does not end the bench)
                print(f"batch {b} {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            slope = (t[a.layers] - t[1]) / max(a.layers - 1, 1)
            rows.append((b, name, t[a.layers], t[1], slope))
            print(f"batch {b} {name} ({defines or 'defaults'}): {a.layers} layers {t[a.layers]:.1f} us, 1 layer "
                  f"{t[1]:.1f} us, {slope:.2f} us a layer", flush=True)
        os.environ["BYTEMAMBA_PERSISTENT_DEFINES"] = ""
        if b in a.profile:
            to_profile = variants
            timed = [r for r in rows if r[0] == b and r[1] != "default" and r[3] is not None]
            if a.profile_best and timed:
                best = min(timed, key=lambda r: r[2])[1]
                to_profile = [v for v in variants if v[0] in ("default", best)]
            for name, defines in to_profile:
                os.environ["BYTEMAMBA_PERSISTENT_DEFINES"] = "+".join(x for x in ("PROFILE=1", defines) if x)
                if not any(r[:2] == (b, name) for r in rows):
                    continue
                conv, ssm = [s.conv for s in cache.layers], [s.ssm for s in cache.layers]
                ps.persistent_layers_fn(ids, P, W, conv, ssm, res)
                torch.cuda.synchronize()
                ps.profile(res.device, dt)
                n = 10
                for _ in range(n):
                    ps.persistent_layers_fn(ids, P, W, conv, ssm, res)
                torch.cuda.synchronize()
                prof = ps.profile(res.device, dt)
                per = [v / n / a.layers / (GHZ * 1e3) for v in prof]
                whole = per[:8]                              # the phases: slots 0..7 plus their parts 8..20
                for ph, parts in ((0, (8, 9, 10, 19, 20)), (4, (11, 12, 13, 14)), (6, (15,))):
                    whole[ph] += sum(per[i] for i in parts)
                profiles.append((b, name, whole, per))
            os.environ["BYTEMAMBA_PERSISTENT_DEFINES"] = ""
        if a.model:
            for env in ("1", "0"):
                os.environ["BYTEMAMBA_PERSISTENT_STEP"] = env
                c2 = m.empty_cache(b, "cuda")
                with torch.no_grad(), torch.autocast("cuda", dtype=dt):
                    us = graph_us(lambda i: m.step(ids, c2), 20, 10)
                path = m.last_step_path
                rows.append((b, f"model step ({path})", us, None, None))
                print(f"batch {b} model step, {path}: {us:.1f} us", flush=True)
            os.environ.pop("BYTEMAMBA_PERSISTENT_STEP")
    if profiles:
        print(f"\nprofile, us a layer (thread 0 of CTA 0, clock64 at {GHZ} GHz; a phase ends where thread 0 ends it):")
        print("| batch | build | " + " | ".join(PHASES) + " | sum |")
        print("|" + "---|" * (len(PHASES) + 3))
        for b, name, whole, per in profiles:
            print(f"| {b} | {name} | " + " | ".join(f"{v:.2f}" for v in whole) + f" | {sum(whole):.2f} |")
        print("\nthe phases' parts, us a layer:")
        print("| batch | build | " + " | ".join(p for p, _ in PARTS) + " |")
        print("|" + "---|" * (len(PARTS) + 2))
        for b, name, whole, per in profiles:
            print(f"| {b} | {name} | " + " | ".join(f"{sum(per[i] for i in sl):.2f}" for _, sl in PARTS) + " |")
    print(f"\n| batch | what | us / step ({a.layers} layers) | 1 layer | us a layer (slope) |")
    print("|---|---|---|---|---|")
    for b, name, t53, t1, slope in rows:
        print(f"| {b} | {name} | {t53:.1f} | {'-' if t1 is None else f'{t1:.1f}'} | "
              f"{'-' if slope is None else f'{slope:.2f}'} |")


if __name__ == "__main__":
    main()
