"""Benchmarks: `bytemamba bench <what> ...` (or `python -m bytemamba.bench <what> ...`).

    scan   the selective scan: our CUDA kernels against the PyTorch path, with the memory and exp floors.

Other benchmarks register themselves in BENCHES (name -> (add_arguments, run)).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

DESIGN_SHAPES = [(8, 2048, 8192, 16), (1, 2048, 131072, 16), (64, 1536, 1024, 16), (16, 4096, 2048, 16)]
# The public Mamba kernel on an H200 (DESIGN.md): forward ms, backward ms.
PUBLIC_MS = {(8, 2048, 8192, 16): (2.68, 9.42), (1, 2048, 131072, 16): (5.87, 22.6),
             (64, 1536, 1024, 16): (1.72, 6.82), (16, 4096, 2048, 16): (2.36, 9.17)}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _parse_shape(s: str):
    parts = tuple(int(p) for p in s.replace("x", ",").split(",") if p)
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"shape {s!r}: expected batch,dim,length,n")
    return parts


def _scan_args(p: argparse.ArgumentParser):
    p.add_argument("--shapes", nargs="+", type=_parse_shape, default=DESIGN_SHAPES,
                   help="shapes batch,dim,length,n (default: the DESIGN.md table)")
    p.add_argument("--iters", type=int, default=20, help="timed repetitions (median reported; at least 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--sets", type=int, default=3, help="input sets rotated between repetitions")
    p.add_argument("--torch-max-gb", type=float, default=40.0,
                   help="skip the PyTorch path where its tensors would need more than this")
    p.add_argument("--variants", default=None,
                   help="comma list of kernel variants to time, each '+'-joined NAME=VALUE compile knobs "
                        "(POLY_J, FWD_UNR, FWD_MINB; 'default' for none), e.g. default,POLY_J=1,FWD_UNR=8")
    p.add_argument("--deterministic", action="store_true", help="also time the deterministic backward")


def _time_ms(fn, iters: int, warmup: int, pre=None) -> float:
    """Median of CUDA-event times around fn (pre, if given, runs untimed before each repetition). The host
    does not wait between repetitions, so host-side launch overhead overlaps the GPU as in training."""
    import torch

    for i in range(warmup):
        if pre:
            pre(i)
        fn(i)
    torch.cuda.synchronize()
    evs = []
    for i in range(iters):
        if pre:
            pre(i)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        evs.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in evs)


def _copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    import torch

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    ms = _time_ms(lambda i: y.copy_(x), 10, 3)
    return 2 * x.numel() / (ms * 1e-3)


def _run_scan(args) -> int:
    import torch

    from bytemamba.ops import scan_cuda
    from bytemamba.ops.scan import cuda_available, selective_scan, selective_scan_chunked

    if not cuda_available():
        print("bench scan: needs a CUDA GPU and CuPy", file=sys.stderr)
        return 2
    import cupy

    iters = max(20, args.iters)
    dtype = getattr(torch, DTYPES[args.dtype])
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    clock_hz = cupy.cuda.runtime.getDeviceProperties(0)["clockRate"] * 1e3
    bw = _copy_bandwidth()
    exp_rate = 16 * sms * clock_hz
    print(f"# bytemamba bench scan  {' '.join(sys.argv[1:])}")
    print(f"# date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; GPU {props.name}, {sms} SMs, "
          f"clock {clock_hz / 1e9:.2f} GHz; torch {torch.__version__}, cupy {cupy.__version__}")
    print(f"# copy bandwidth {bw / 1e12:.2f} TB/s (read+write); exp2 rate {exp_rate / 1e12:.2f} T/s (16/clk/SM)")
    variants = [None] if args.variants is None else [v.strip() for v in args.variants.split(",") if v.strip()]
    rows = []
    for (b, d, L, n) in args.shapes:
        g = torch.Generator(device="cuda").manual_seed(b * 7 + d + L + n)

        def fresh():
            r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
            return dict(u=r(b, d, L).to(dtype), delta=(r(b, d, L) * 0.5 - 1).to(dtype),
                        A=-torch.exp(r(d, n) * 0.5 + 0.5), B=r(b, n, L).to(dtype), C=r(b, n, L).to(dtype),
                        D=r(d), z=r(b, d, L).to(dtype), delta_bias=r(d) * 0.3)
        sets = [fresh() for _ in range(args.sets)]
        dout = [torch.randn(b, d, L, device="cuda", generator=g).to(dtype) for _ in range(args.sets)]
        es = torch.tensor([], dtype=dtype).element_size()
        elems = b * d * L
        bytes_f = elems * es * 4 + 2 * b * n * L * es
        bytes_b = elems * es * 7 + 2 * b * n * L * es + 2 * b * n * L * 4
        floor_mem_f, floor_mem_b = bytes_f / bw * 1e3, bytes_b / bw * 1e3
        floor_exp = elems * n / exp_rate * 1e3

        def run(fn, s, grad):
            ins = sets[s]
            if grad:
                ins = {k: v.detach().requires_grad_(True) for k, v in ins.items()}
            out = fn(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"], ins["D"], ins["z"], ins["delta_bias"],
                     True)
            return out, ins

        for poly in variants:
            if poly is not None:
                knobs = [k for k in poly.split("+") if k and k != "default"]
                pm = [k for k in knobs if k.startswith("POLY_J=")]
                os.environ["BYTEMAMBA_SCAN_POLY"] = pm[0].split("=")[1] if pm else "0"
                os.environ["BYTEMAMBA_SCAN_DEFINES"] = "+".join(k for k in knobs if not k.startswith("POLY_J="))
            cuda_fn = lambda *a: selective_scan(*a, backend="cuda")  # noqa: E731
            t0 = time.perf_counter()
            with torch.no_grad():
                run(cuda_fn, 0, False)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            with torch.no_grad():
                fwd = _time_ms(lambda i: run(cuda_fn, i % args.sets, False), iters, args.warmup)
            holder = {}

            def pre(i):
                holder["out"], _ = run(cuda_fn, i % args.sets, True)

            bwd = _time_ms(lambda i: holder["out"].backward(dout[i % args.sets]), iters, args.warmup, pre)
            bwd_det = None
            if args.deterministic:
                scan_cuda.set_deterministic(True)
                bwd_det = _time_ms(lambda i: holder["out"].backward(dout[i % args.sets]), iters, args.warmup, pre)
                scan_cuda.set_deterministic(None)
            holder.clear()
            rows.append(dict(shape=(b, d, L, n), poly=poly, fwd=fwd, bwd=bwd, bwd_det=bwd_det, first_s=first,
                             floor_mem_f=floor_mem_f, floor_mem_b=floor_mem_b, floor_exp=floor_exp))
            pub = PUBLIC_MS.get((b, d, L, n))
            msg = (f"cuda  shape {b},{d},{L},{n} variant={poly or 'default'}: fwd {fwd:.3f} ms, bwd {bwd:.3f} ms"
                   + (f", bwd deterministic {bwd_det:.3f} ms" if bwd_det else "")
                   + f"; first call {first:.2f} s (compile included)")
            if pub:
                msg += f"; vs public {pub[0] / fwd:.2f}x / {pub[1] / bwd:.2f}x"
            print(msg, flush=True)
        # The PyTorch path, where it fits.
        need_gb = b * d * n * L * 4 * 12 / 1e9
        tf = tb = None
        torch_note = f"skipped (needs ~{need_gb:.0f} GB > --torch-max-gb)"
        if need_gb <= args.torch_max_gb:
            holder = {}
            try:
                with torch.no_grad():
                    tf = _time_ms(lambda i: run(selective_scan_chunked, i % args.sets, False), iters, args.warmup)

                def pre_t(i):
                    holder["out"], _ = run(selective_scan_chunked, i % args.sets, True)

                tb = _time_ms(lambda i: holder["out"].backward(dout[i % args.sets]), iters, args.warmup, pre_t)
            except torch.OutOfMemoryError:
                torch_note = "out of GPU memory" + (f" in backward (fwd {tf:.1f} ms)" if tf else "")
                tf = tb = None
            holder.clear()
            torch.cuda.empty_cache()
        for r in rows:
            if r["shape"] == (b, d, L, n):
                r["torch_fwd"], r["torch_bwd"] = tf, tb
        for r in rows:
            if r["shape"] == (b, d, L, n):
                r["torch_note"] = torch_note
        print(f"torch shape {b},{d},{L},{n}: " + (f"fwd {tf:.2f} ms, bwd {tb:.2f} ms" if tf else torch_note), flush=True)
        del sets, dout
        torch.cuda.empty_cache()

    print()
    print("| shape (b, d, L, n) | variant | fwd ms | bwd ms | public fwd/bwd ms | speed-up fwd / bwd | "
          "mem floor fwd / bwd ms | exp floor ms | PyTorch path fwd / bwd ms | first call s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pub = PUBLIC_MS.get(r["shape"])
        sp = f"{pub[0] / r['fwd']:.2f}x / {pub[1] / r['bwd']:.2f}x" if pub else "-"
        pubs = f"{pub[0]} / {pub[1]}" if pub else "-"
        tp = (f"{r['torch_fwd']:.1f} / {r['torch_bwd']:.1f}" if r.get("torch_fwd") else r.get("torch_note", "-"))
        var = r["poly"] or "default"
        bwd = f"{r['bwd']:.3f}" + (f" (det {r['bwd_det']:.3f})" if r["bwd_det"] else "")
        print(f"| {', '.join(map(str, r['shape']))} | {var} | {r['fwd']:.3f} | {bwd} | {pubs} | {sp} | "
              f"{r['floor_mem_f']:.3f} / {r['floor_mem_b']:.3f} | {r['floor_exp']:.3f} | {tp} | {r['first_s']:.2f} |")
    return 0


BENCHES = {"scan": (_scan_args, _run_scan)}


def _generate_args(p):
    from bytemamba.bench_generate import add_arguments
    add_arguments(p)


def _run_generate(args):
    from bytemamba.bench_generate import run
    return run(args)


# generate: decoding symbols/s of the graph-captured Mamba decoder beside a KV-cache Transformer
BENCHES["generate"] = (_generate_args, _run_generate)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="bytemamba bench", description="benchmarks")
    sub = p.add_subparsers(dest="what", required=True)
    for name, (add, _) in BENCHES.items():
        add(sub.add_parser(name))
    args = p.parse_args(argv)
    return BENCHES[args.what][1](args)


if __name__ == "__main__":
    sys.exit(main())
