"""`bytemamba bench generate`: decoding speed, symbols per second, of our graph-captured Mamba decoder beside
a same-size Transformer decoding with a KV cache through scaled_dot_product_attention, in the same run.

For each model size and batch: fresh random weights; a random prompt of --prompt symbols prefilled through
the parallel path (our CUDA scan), then --new symbols decoded, each step (embedding, all layers, head,
sampling at temperature 1) one CUDA-graph replay. Step time: CUDA events around chunks of replays, the
median over chunks after warm-up. The Transformer keeps its KV cache at --prompt positions (random keys and
values; the cost does not depend on them) and is timed over --transformer-steps replays of the same kind.
Next to each step time: the GPU operations per step (counted with the profiler on one eager step) times the
measured cost of one tiny kernel replayed in a graph, the launch floor that fusion can still remove.
"""

from __future__ import annotations

import datetime
import statistics
import sys
import time

MODELS = {
    # name: (Mamba config, Transformer (d_model, n_layer, n_head)), sized like Mamba's SC09 audio models and
    # MambaByte-353M, each Transformer of about the same parameter count.
    "audio6m": (dict(d_model=256, n_layer=15), (256, 8, 4)),
    "byte353m": (dict(d_model=1024, n_layer=53), (1024, 28, 16)),
}


def add_arguments(p):
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64, 256])
    p.add_argument("--prompt", type=int, default=2048, help="prompt length (prefill) / Transformer context")
    p.add_argument("--new", type=int, default=1024, help="symbols decoded (timed) per sequence")
    p.add_argument("--chunk", type=int, default=32, help="replays per timed chunk")
    p.add_argument("--transformer-steps", type=int, default=256, help="timed Transformer steps")
    p.add_argument("--no-transformer", action="store_true")
    p.add_argument("--torch-step", nargs="*", type=int, default=None, metavar="BATCH",
                   help="also time the Mamba step with plain PyTorch ops (graph-captured) at these batches")
    p.add_argument("--no-profile", action="store_true", help="skip counting GPU operations per step")
    p.add_argument("--gemv-max-batch", type=int, default=None,
                   help="override ByteMambaLM.gemv_max_batch (fused GEMV path up to this batch; 0 = cuBLAS always)")
    p.add_argument("--fused-max-batch", type=int, default=None,
                   help="override ByteMambaLM.fused_max_batch (one-kernel step up to this batch where the model's "
                        "shape allows; 0 = off)")
    p.add_argument("--breakdown", nargs="*", default=[], metavar="MODEL:BATCH",
                   help="print GPU time per kernel of eager Mamba steps for these configurations")


def _events_ms(fn, n: int) -> float:
    import torch
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def _step_ms(replay, total: int, chunk: int, warmup: int = 8) -> float:
    for _ in range(warmup):
        replay()
    chunks = []
    done = 0
    while done < total:
        n = min(chunk, total - done)
        chunks.append(_events_ms(replay, n) / n)
        done += n
    return statistics.median(chunks)


def graph_us(launch, count: int, reps: int = 20) -> float:
    """Microseconds per call of launch(i), i = 0..count-1, captured in one CUDA graph: the median over `reps`
    replays (CUDA events around each), after one warm-up call outside the capture on a side stream."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        launch(0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(count):
            launch(i)
    g.replay()
    torch.cuda.synchronize()
    return statistics.median(_events_ms(g.replay, 1) for _ in range(reps)) * 1e3 / count


def launch_cost_us(n: int = 512) -> float:
    """One tiny kernel replayed inside a CUDA graph, microseconds."""
    import torch
    x = torch.zeros(1, device="cuda")
    return graph_us(lambda i: x.add_(1), n)


def count_gpu_ops(fn) -> int | None:
    """GPU operations (kernels, memsets, copies) that one eager call of fn launches."""
    import torch
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    except Exception as exc:                       # the profiler is a convenience here, never a failure
        print(f"# profiler unavailable: {exc}", file=sys.stderr)
        return None


_BUILT: dict = {}


def kernel_breakdown(fn, steps: int = 5, top: int = 12) -> None:
    """GPU time per kernel name over `steps` eager calls of fn (torch.profiler), per step, largest first."""
    import torch
    try:
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn()
            torch.cuda.synchronize()
        rows = []
        for ev in prof.key_averages():
            t = getattr(ev, "device_time_total", None)
            if t is None:
                t = getattr(ev, "cuda_time_total", 0)
            if t > 0:
                rows.append((t / steps, ev.count / steps, ev.key))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        print(f"#   kernel time per step {total:.1f} us (eager, summed; top {top}):")
        for t, c, k in rows[:top]:
            print(f"#   {t:8.1f} us  x{c:5.1f}  {k[:110]}")
    except Exception as exc:
        print(f"# breakdown unavailable: {exc}", file=sys.stderr)


def _model(kind, cfg, backend="cuda"):
    """Fresh random weights, built on the GPU once per model and reused across batch sizes."""
    import torch

    from bytemamba.baselines import KVTransformer
    from bytemamba.config import ModelConfig
    from bytemamba.models.lm import ByteMambaLM

    key = (kind, repr(cfg))
    if key not in _BUILT:
        _BUILT.clear()
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        with torch.device("cuda"):
            if kind == "mamba":
                _BUILT[key] = ByteMambaLM(ModelConfig(**cfg)).eval()
            else:
                _BUILT[key] = KVTransformer(*cfg[:3], max_len=cfg[3] + 1).to(torch.bfloat16).eval()
    m = _BUILT[key]
    if kind == "mamba":
        m.config.scan_backend = backend
        for layer in m.backbone.layers:
            layer.mixer.scan_backend = backend
    return m


def _bench_mamba(cfg_kw, batch, args, backend):
    import torch

    from bytemamba.decode import GraphDecoder
    from bytemamba.generate import Sampling, sample_next

    model = _model("mamba", cfg_kw, backend)
    if args.gemv_max_batch is not None:
        model.gemv_max_batch = args.gemv_max_batch
    if getattr(args, "fused_max_batch", None) is not None:
        model.fused_max_batch = args.fused_max_batch
    params = model.num_parameters()
    sampling = Sampling(temperature=1.0)
    prompt = torch.randint(0, 256, (batch, args.prompt), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.prefill(prompt[:, :64])                       # compile / warm the parallel path
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits, cache = model.prefill(prompt)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dec = GraphDecoder(model, batch, sampling).capture()
        torch.cuda.synchronize()
        capture_s = time.perf_counter() - t0
        gen = dec.seed(0)
        dec.load(cache, sample_next(logits, sampling, gen))
        del logits, cache
        ops = None if args.no_profile else count_gpu_ops(dec._body)
        ms = _step_ms(dec.graph.replay, max(1, args.new - 1), args.chunk)
        assert torch.isfinite(dec.logp).all()
        if f"{args._model_name}:{batch}" in args.breakdown:
            kernel_breakdown(dec._body)
    del dec
    torch.cuda.empty_cache()
    return dict(params=params, ms=ms, ops=ops, prefill_s=prefill_s, capture_s=capture_s,
                path=getattr(model, "last_step_path", "") or "?")


def _bench_transformer(tcfg, batch, args):
    import torch

    from bytemamba.generate import Sampling, sample_next

    model = _model("transformer", (*tcfg, args.prompt))
    params = model.num_parameters()
    sampling = Sampling(temperature=1.0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        cache = model.empty_cache(batch, args.prompt, "cuda", torch.bfloat16)
        ids = torch.randint(0, 256, (batch,), device="cuda")
        pos = torch.full((batch,), args.prompt, device="cuda", dtype=torch.long)

        def body():
            logits = model.step(ids, pos, cache)
            ids.copy_(sample_next(logits, sampling, gen))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                body()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        g.register_generator_state(gen)
        with torch.cuda.graph(g):
            body()
        ops = None if args.no_profile else count_gpu_ops(body)
        ms = _step_ms(g.replay, args.transformer_steps, args.chunk)
    del g, cache
    torch.cuda.empty_cache()
    return dict(params=params, ms=ms, ops=ops)


def _guard(fn, *a):
    """One configuration failing (out of memory, say) is reported and the others still run."""
    import traceback

    import torch
    try:
        return fn(*a)
    except Exception:
        print(f"# {fn.__name__}{a[:2]} failed:\n{traceback.format_exc(limit=4)}", flush=True)
        torch.cuda.empty_cache()
        return None


def run(args) -> int:
    import torch

    from bytemamba.ops.scan import cuda_available
    if not cuda_available():
        print("bench generate: needs a CUDA GPU and CuPy", file=sys.stderr)
        return 2
    import cupy
    props = torch.cuda.get_device_properties(0)
    print(f"# bytemamba bench generate  {' '.join(sys.argv[1:])}")
    print(f"# date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; GPU {props.name}, "
          f"{props.multi_processor_count} SMs; torch {torch.__version__}, cupy {cupy.__version__}")
    launch_us = launch_cost_us()
    print(f"# one tiny kernel replayed in a graph: {launch_us:.2f} us", flush=True)
    rows = []
    for name in args.models:
        mcfg, tcfg = MODELS[name]
        args._model_name = name
        for b in args.batches:
            r = _guard(_bench_mamba, mcfg, b, args, "cuda")
            if r is None:
                continue
            r.update(model=name, kind=f"mamba ({r['path']} step)", batch=b)
            rows.append(r)
            print(f"{name} mamba b={b}: {r['ms']:.4f} ms/step, {b / r['ms'] * 1e3:,.0f} sym/s, ops {r['ops']}, "
                  f"prefill {r['prefill_s']:.2f} s, capture {r['capture_s']:.2f} s, {r['params'] / 1e6:.1f}M params",
                  flush=True)
        for b in args.torch_step or []:
            r = _guard(_bench_mamba, mcfg, b, args, "torch")
            if r is None:
                continue
            r.update(model=name, kind="mamba (PyTorch step ops)", batch=b)
            rows.append(r)
            print(f"{name} mamba-torch-step b={b}: {r['ms']:.4f} ms/step, ops {r['ops']}", flush=True)
        if not args.no_transformer:
            for b in args.batches:
                t = _guard(_bench_transformer, tcfg, b, args)
                if t is None:
                    continue
                t.update(model=name, kind="transformer (KV cache, SDPA)", batch=b)
                rows.append(t)
                print(f"{name} transformer b={b}: {t['ms']:.4f} ms/step, {b / t['ms'] * 1e3:,.0f} sym/s, "
                      f"ops {t['ops']}, {t['params'] / 1e6:.1f}M params", flush=True)
    _BUILT.clear()
    print()
    print(f"| model | decoder | params | batch | ms / step | symbols / s | GPU ops / step | launch floor ms "
          f"(ops x {launch_us:.2f} us) | Mamba / Transformer speed |")
    print("|---|---|---|---|---|---|---|---|---|")
    tf = {(r["model"], r["batch"]): r["ms"] for r in rows if r["kind"].startswith("transformer")}
    for r in sorted(rows, key=lambda r: (args.models.index(r["model"]), r["batch"], r["kind"])):
        sps = r["batch"] / r["ms"] * 1e3
        floor = f"{r['ops'] * launch_us / 1e3:.3f}" if r["ops"] else "-"
        ratio = "-"
        if r["kind"].startswith("mamba") and (r["model"], r["batch"]) in tf:
            ratio = f"{tf[(r['model'], r['batch'])] / r['ms']:.2f}x"
        print(f"| {r['model']} | {r['kind']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['ms']:.4f} | "
              f"{sps:,.0f} | {r['ops'] or '-'} | {floor} | {ratio} |")
    return 0
