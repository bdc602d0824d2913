"""Micro-benchmark of the decode state update `ssm_step` (cuda/decode_step.cu) at the shapes of the bench models:
each variant (rR: ssm_step_rR, R rows a block, through BYTEMAMBA_STEP_TUNE, or the launcher's choice "auto"; the
previous kernel compiled from a saved copy of the old source, --old) replayed in a CUDA graph, microseconds per
launch (CUDA events around one replay of `count` launches, median of --reps replays).

As in decoding, each launch works on the state, W_dt, A, D and dt_bias of another "layer" (rotated through enough
layers that they total >= 200 MB, 4x the L2, so they come from DRAM), while x, z and x_dbl (dt_low | B | C) are
one set of buffers, hot in L2 as the previous kernel leaves them. Inputs in bf16, as under autocast.
Before timing, one step of every variant is compared with the first variant (same inputs): max |diff| printed.

    git show ede42c1:cuda/decode_step.cu > /tmp/v3.cu
    python3 scripts/bench_ssm_step.py --old /tmp/v3.cu --shapes byte353m:1 byte353m:64 audio6m:256
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODELS = {"byte353m": (2048, 16, 64), "audio6m": (512, 16, 16)}      # d_inner, d_state, dt_rank


def main() -> int:
    import numpy as np
    import torch

    from bytemamba.bench_generate import graph_us
    from bytemamba.ops import step
    from bytemamba.ops._cupy import cupy_stream, ptr

    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", metavar="MODEL:BATCH",
                   default=[f"byte353m:{b}" for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
                   + [f"audio6m:{b}" for b in (1, 8, 64, 128, 256)])
    p.add_argument("--variants", nargs="+", default=["auto", "r1", "r2", "r4"],
                   help="auto: the launcher's choice; rR: ssm_step_rR (R rows a block)")
    p.add_argument("--old", default=None, help="a copy of the previous decode_step.cu (kernel `ssm_step`, "
                   "4 rows a block), timed as variant v3")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--mb", type=float, default=200.0, help="rotated per-layer data, MB")
    a = p.parse_args()
    dev = torch.device("cuda")
    old = None
    if a.old:
        import cupy
        major, minor = torch.cuda.get_device_capability(dev)
        mod = cupy.RawModule(code=open(a.old).read(), backend="nvrtc",
                             options=("--std=c++17", f"-arch=sm_{major}{minor}", "-DIN_DTYPE=1", "-DNSTATE=16",
                                      "-DSSM_ROWS=4", "-DGB=1", "-DRPW=2", "-DUK=4"))
        old = mod.get_function("ssm_step")
    variants = (["v3"] if old is not None else []) + a.variants
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}; us per launch, median of {a.reps}")
    table = []
    for shape in a.shapes:
        model, _, bs_ = shape.partition(":")
        b = int(bs_)
        e, n, r = MODELS[model]
        g = torch.Generator(device=dev).manual_seed(b)
        rnd = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
        per_layer = b * e * n * 4 + e * (r + n + 2) * 4
        L = max(4, min(512, int(a.mb * 2 ** 20 // per_layer)))
        layers = []
        for _ in range(L):
            dt0 = torch.empty(e, device=dev).uniform_(0.001, 0.1, generator=g)
            layers.append(dict(state=rnd(b, e, n), W=(torch.rand(e, r, device=dev, generator=g) * 2 - 1) * r ** -0.5,
                               A=-torch.arange(1, n + 1, device=dev, dtype=torch.float32).repeat(e, 1),
                               D=rnd(e), bias=dt0 + torch.log(-torch.expm1(-dt0))))
        xz = rnd(b, 2 * e).to(torch.bfloat16)
        xc = rnd(b, e).to(torch.bfloat16)
        x_dbl = rnd(b, r + 2 * n).to(torch.bfloat16)
        y_old = torch.empty(b, e, device=dev, dtype=torch.bfloat16)

        def launch(v, ly):
            if v == "v3":
                args = (ptr(ly["state"]), ptr(xc), np.int64(e), ptr(x_dbl), np.int64(r + 2 * n), ptr(ly["W"]),
                        np.int32(r), ptr(ly["bias"]), ptr(ly["A"]), ptr(x_dbl[:, r:]), np.int64(r + 2 * n),
                        ptr(x_dbl[:, r + n:]), np.int64(r + 2 * n), ptr(ly["D"]), ptr(xz[:, e:]), np.int64(2 * e),
                        ptr(y_old), np.int32(b), np.int32(e), np.int32(1))
                with cupy_stream(dev):
                    old((-(-e // 32), -(-b // 4)), (128,), args)
                return y_old
            return step.ssm_state_update_fn(ly["state"], xc, x_dbl[:, :r], ly["A"], x_dbl[:, r:r + n],
                                            x_dbl[:, r + n:], ly["D"], xz[:, e:], ly["bias"], dt_softplus=True,
                                            dt_proj_weight=ly["W"])

        def env(v):
            os.environ.pop("BYTEMAMBA_STEP_TUNE", None)
            if v.startswith("r"):
                os.environ["BYTEMAMBA_STEP_TUNE"] = f"ssm_rows={v[1:]}"

        # one step of every variant from the same state: against the first variant
        ref = None
        for v in variants:
            env(v)
            ly = dict(layers[0], state=layers[0]["state"].clone())
            try:
                y = launch(v, ly).float()
            except ValueError as exc:                    # a variant refused for this shape
                print(f"{shape} {v}: {exc}")
                continue
            torch.cuda.synchronize()
            if ref is None:
                ref = (y, ly["state"])
            else:
                dy, ds = (y - ref[0]).abs().max().item(), (ly["state"] - ref[1]).abs().max().item()
                print(f"{shape:>13} {v:>5}: max|dy| {dy:.2e} (max|y| {ref[0].abs().max().item():.2e}), "
                      f"max|ds| {ds:.2e}")
        count = L * -(-200 // L)
        row = {}
        for v in variants:
            env(v)
            try:
                row[v] = graph_us(lambda i, v=v, ls=layers: launch(v, ls[i % L]), count, a.reps)
            except Exception as exc:                     # a variant that cannot run here: reported, not fatal
                print(f"{shape} {v}: {type(exc).__name__}: {exc}")
        env("auto")
        auto_rows = f"r{step.ssm_rows(b, e, n, r, dev)}"
        os.environ.pop("BYTEMAMBA_STEP_TUNE", None)
        traffic = 2 * b * e * n * 4 / 1e3                  # state read + written, KB -> GB/s with us
        print(f"{shape:>13}: L {L}, count {count}, auto rows {auto_rows}: "
              + ", ".join(f"{k} {t:.2f}" for k, t in row.items()), flush=True)
        table.append((shape, auto_rows, row, traffic))
        del layers
        torch.cuda.empty_cache()
    print("\n| shape | " + " | ".join(variants) + " | auto = | auto vs v3 | auto state GB/s |")
    print("|---|" + "---|" * (len(variants) + 3))
    for shape, auto_rows, row, traffic in table:
        cells = [f"{row[v]:.2f}" if v in row else "-" for v in variants]
        ratio = f"{row['v3'] / row['auto']:.2f}x" if "v3" in row and "auto" in row else "-"
        bw = f"{traffic / row['auto']:.0f}" if "auto" in row else "-"
        print(f"| {shape} | " + " | ".join(cells) + f" | {auto_rows} | {ratio} | {bw} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
