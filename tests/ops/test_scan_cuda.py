"""GPU tests of the CUDA selective scan (bytemamba/ops/scan_cuda.py) against the reference.

Every check draws fresh random inputs (never zeros). fp32 results are compared with a float64 reference
(selective_scan_chunked on float64 inputs, which the tests of scan.py tie to selective_scan_ref; short
cases also against selective_scan_ref itself); in bf16/fp16 the kernel's error must be at most about
twice the error PyTorch makes on the same bf16/fp16 inputs.
"""


import pytest
import torch

from bytemamba.ops.scan import cuda_available, selective_scan, selective_scan_chunked, selective_scan_ref
from helpers.kernel_checks import rel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU and CuPy")]

DEV = "cuda"


def make_inputs(b, d, L, n, dtype=torch.float32, z=True, D=True, bias=True, init=False, reset=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ins = dict(
        u=r(b, d, L).to(DEV, dtype),
        delta=(r(b, d, L) * 0.5 - 1.0).to(DEV, dtype),
        A=(-torch.exp(r(d, n) * 0.5 + 0.5)).to(DEV),
        B=r(b, n, L).to(DEV, dtype),
        C=r(b, n, L).to(DEV, dtype),
        D=r(d).to(DEV) if D else None,
        z=r(b, d, L).to(DEV, dtype) if z else None,
        delta_bias=(r(d) * 0.3).to(DEV) if bias else None,
        initial_state=r(b, d, n).to(DEV) if init else None,
        reset=(torch.rand(b, L, generator=g) < 0.05).to(DEV) if reset else None,
    )
    return ins


def call(fn, ins, softplus=True, final=True, **kw):
    return fn(ins["u"], ins["delta"], ins["A"], ins["B"], ins["C"], ins["D"], ins["z"], ins["delta_bias"],
              softplus, ins["initial_state"], final, ins["reset"], **kw)


def grads(fn, ins, softplus=True, seed=1, dtype=None):
    """out, final and the gradients of a random linear function of (out, final) for every float input."""
    leaf = {k: (v.detach().clone().requires_grad_(True) if v is not None and v.is_floating_point() else v)
            for k, v in ins.items()}
    if dtype is not None:
        leaf_in = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in leaf.items()}
    else:
        leaf_in = leaf
    out, fin = call(fn, leaf_in, softplus=softplus, final=True)
    g = torch.Generator(device="cpu").manual_seed(seed)
    wo = torch.randn(out.shape, generator=g).to(DEV)
    wf = torch.randn(fin.shape, generator=g).to(DEV)
    loss = (out.double() * wo.double()).sum() + (fin.double() * wf.double()).sum()
    loss.backward()
    gr = {k: v.grad for k, v in leaf.items() if v is not None and v.is_floating_point()}
    return out.detach(), fin.detach(), gr


def ref64(ins):
    return {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in ins.items()}


def cuda_fn(*a):
    return selective_scan(*a, backend="cuda")


SHAPES = [
    (2, 5, 1, 16),        # length 1
    (2, 7, 37, 16),       # odd, shorter than a tile
    (1, 33, 64, 16),      # exactly one tile, dim not a multiple of the block's channels
    (3, 40, 129, 16),     # one past two tiles
    (2, 9, 1000, 16),
    (2, 6, 300, 5),       # n not a power of two
    (1, 4, 200, 1),
    (2, 3, 150, 33),
    (1, 3, 130, 64),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", [dict(), dict(init=True, reset=True), dict(z=False, D=False, bias=False)])
def test_fp32_forward_and_grads(shape, opts):
    b, d, L, n = shape
    ins = make_inputs(b, d, L, n, **opts)
    softplus = opts.get("bias", True)
    if not softplus:                       # raw delta is the step size: keep it positive (a stable scan)
        ins["delta"] = ins["delta"].abs() * 0.5
    out, fin, gk = grads(cuda_fn, ins, softplus=softplus)
    ro, rf, gr = grads(selective_scan_chunked, ref64(ins), softplus=softplus)
    assert torch.isfinite(out).all()
    assert rel(out, ro) < 2e-5, rel(out, ro)
    assert rel(fin, rf) < 2e-5, rel(fin, rf)
    for k in gr:
        assert k in gk, k
        e = rel(gk[k], gr[k])
        assert e < 1e-4, (k, e)


def test_matches_definition_exactly_short():
    ins = make_inputs(2, 6, 23, 8, init=True, reset=True, seed=3)
    out, fin = call(cuda_fn, ins)
    ro, rf = call(selective_scan_ref, ref64(ins))
    assert rel(out, ro) < 2e-5 and rel(fin, rf) < 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L", [1, 77, 2048 + 3])
def test_low_precision_within_twice_pytorch(dtype, L):
    ins32 = make_inputs(2, 24, L, 16, init=True, reset=True, seed=L)
    ins = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v) for k, v in ins32.items()}
    out, fin, gk = grads(cuda_fn, ins)
    tout, tfin, gt = grads(selective_scan_chunked, ins)
    ro, rf, gr = grads(selective_scan_chunked, ref64(ins))
    assert out.dtype == dtype
    e_k, e_t = rel(out, ro), rel(tout, ro)
    assert e_k <= 2 * e_t + 1e-6, (e_k, e_t)
    assert rel(fin, rf) <= 2 * rel(tfin, rf) + 1e-5
    for k in gr:
        e_k, e_t = rel(gk[k], gr[k]), rel(gt[k], gr[k])
        assert e_k <= 2 * e_t + 1e-5, (k, e_k, e_t)


def test_long_length():
    L = 300_001
    ins = make_inputs(1, 4, L, 16, init=True, reset=True, seed=7)
    out, fin, gk = grads(cuda_fn, ins)
    ro, rf, gr = grads(selective_scan_chunked, ref64(ins))
    assert rel(out, ro) < 1e-4 and rel(fin, rf) < 1e-4
    for k in gr:
        assert rel(gk[k], gr[k]) < 1e-3, k


def test_large_batch_times_dim():
    ins = make_inputs(2, 40_000, 5, 4, init=True, seed=11)        # 80,000 channels > 65,535
    out, fin, gk = grads(cuda_fn, ins)
    ro, rf, gr = grads(selective_scan_chunked, ref64(ins))
    assert rel(out, ro) < 2e-5 and rel(fin, rf) < 2e-5
    for k in gr:
        assert rel(gk[k], gr[k]) < 1e-4, k


@pytest.mark.parametrize("nseg", ["3", "7"])
def test_parallel_segments(monkeypatch, nseg):
    """Forward and backward split along L into parallel segments (as for long L, few channels)."""
    monkeypatch.setenv("BYTEMAMBA_SCAN_NSEG", nseg)
    ins = make_inputs(2, 8, 5000, 16, init=True, reset=True, seed=5)
    out, fin, gk = grads(cuda_fn, ins)
    ro, rf, gr = grads(selective_scan_chunked, ref64(ins))
    assert rel(out, ro) < 2e-5 and rel(fin, rf) < 2e-5
    for k in gr:
        assert rel(gk[k], gr[k]) < 1e-4, k


def test_polynomial_exp_variant(monkeypatch):
    monkeypatch.setenv("BYTEMAMBA_SCAN_POLY", "5")
    ins = make_inputs(2, 16, 700, 16, init=True, reset=True, seed=9)
    out, fin, gk = grads(cuda_fn, ins)
    ro, rf, gr = grads(selective_scan_chunked, ref64(ins))
    assert rel(out, ro) < 2e-5 and rel(fin, rf) < 2e-5
    for k in gr:
        assert rel(gk[k], gr[k]) < 1e-4, k


@pytest.mark.parametrize("defines", ["FWD_MINB=3", "FWD_NTHR=64+FWD_MINB=4", "FWD_CPT=1", "FWD_CPT=4"])
def test_forward_builds(monkeypatch, defines):
    """Each forward build forced (the launcher's two: 128- and 64-thread blocks; 1 or 4 channels a thread) computes
    the same function: channel blocks that run past dim, n padded to 16 and 64, initial state, resets, parallel
    L-segments (the aggregate kernel), fp32 against float64 and bf16 within twice PyTorch's own bf16 error."""
    monkeypatch.setenv("BYTEMAMBA_SCAN_DEFINES", defines)
    for shape, nseg in (((2, 70, 300, 16), "0"), ((1, 37, 200, 33), "0"), ((1, 70, 2000, 16), "3")):
        monkeypatch.setenv("BYTEMAMBA_SCAN_NSEG", nseg)
        ins = make_inputs(*shape, init=True, reset=True, seed=21)
        out, fin, gk = grads(cuda_fn, ins)
        ro, rf, gr = grads(selective_scan_chunked, ref64(ins))
        assert rel(out, ro) < 2e-5 and rel(fin, rf) < 2e-5, (shape, rel(out, ro), rel(fin, rf))
        for k in gr:
            assert rel(gk[k], gr[k]) < 1e-4, (shape, k)
    monkeypatch.setenv("BYTEMAMBA_SCAN_NSEG", "0")
    ins32 = make_inputs(2, 130, 1000, 16, init=True, reset=True, seed=22)
    ins = {k: (v.to(torch.bfloat16) if k in ("u", "delta", "B", "C", "z") else v) for k, v in ins32.items()}
    out, fin, gk = grads(cuda_fn, ins)
    tout, tfin, gt = grads(selective_scan_chunked, ins)
    ro, rf, gr = grads(selective_scan_chunked, ref64(ins))
    assert rel(out, ro) <= 2 * rel(tout, ro) + 1e-6, (rel(out, ro), rel(tout, ro))
    assert rel(fin, rf) <= 2 * rel(tfin, rf) + 1e-5


def test_deterministic_mode_same_bits():
    from bytemamba.ops import scan_cuda
    ins = make_inputs(2, 256, 3000, 16, dtype=torch.bfloat16, seed=13)
    scan_cuda.set_deterministic(True)
    try:
        runs = [grads(cuda_fn, ins)[2] for _ in range(3)]
    finally:
        scan_cuda.set_deterministic(None)
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]) and torch.equal(runs[0][k], runs[2][k]), k
    ro, rf, gr = grads(selective_scan_chunked, ref64(ins))
    fast = grads(cuda_fn, ins)[2]
    for k in gr:
        assert abs(rel(runs[0][k], gr[k]) - rel(fast[k], gr[k])) < 1e-3, k


def test_cuda_graph_capture_and_compile():
    ins = make_inputs(2, 64, 300, 16, dtype=torch.bfloat16, seed=17)
    ref = call(cuda_fn, ins, final=False)
    static = {k: (v.clone() if v is not None else None) for k, v in ins.items()}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call(cuda_fn, static, final=False)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(cuda_fn, static, final=False)
    fresh = make_inputs(2, 64, 300, 16, dtype=torch.bfloat16, seed=18)
    for k, v in fresh.items():
        if v is not None:
            static[k].copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, call(cuda_fn, fresh, final=False))
    assert not torch.equal(out, ref)

    compiled = torch.compile(lambda *a: selective_scan(*a, backend="cuda"), fullgraph=True)
    oc = call(compiled, ins, final=False)
    assert torch.equal(oc, ref)


def test_clear_errors():
    ins = make_inputs(1, 2, 10, 65)
    with pytest.raises(ValueError, match="n=65"):
        call(cuda_fn, ins)
    ins = make_inputs(1, 2, 10, 4)
    with pytest.raises(TypeError, match="float64"):
        call(cuda_fn, ref64(ins))
    cpu = {k: (v.cpu() if v is not None else None) for k, v in ins.items()}
    with pytest.raises(RuntimeError, match="cuda"):
        call(cuda_fn, cpu)


def test_auto_backend_uses_torch_outside_the_kernel_envelope():
    ins = ref64(make_inputs(1, 3, 40, 8, seed=21))
    out = call(lambda *a: selective_scan(*a, backend="auto"), ins, final=False)
    assert out.dtype == torch.float64
    assert rel(out, call(selective_scan_chunked, ins, final=False)) < 1e-12
