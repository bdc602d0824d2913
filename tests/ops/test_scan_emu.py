"""The CUDA scan (cuda/selective_scan.cu: ss_fwd, ss_fwd_agg; cuda/scan_bwd.cu: scan_bwd, scan_bwd_agg) run on the
CPU through the emulation in tests/helpers/cuda_emu.h, against the definition: the kernels' logic checked where
there is no GPU (CI).

Forward: the launcher's two builds (128- and 64-thread blocks, 2 channels a thread) and FWD_CPT 1 / 4,
with channel blocks that run past dim, n padded to 16 and to 64, an initial state, resets, parallel L-segments (the
aggregate kernel), fp32, bf16 and fp16 (n padded to 32) inputs; outputs, final state and the checkpoints (the state before each tile, which
the backward reads). Backward: the launcher's two builds (3 and 2 blocks an SM), dB / dC by atomics and by per-block
partials (deterministic mode), segments, fp32 and bf16 (the 2-an-SM build's prefetch); every gradient. The launch
sequences mirror bytemamba/ops/scan_cuda.py `_fwd_impl` / `_bwd_impl`. exp, log and tanh are the C library's here,
not MUFU's approximations; timing and bank conflicts are not emulated (the GPU tests and benchmarks own those).
"""

import ctypes
import math

import pytest
import torch

from bytemamba.ops.scan import selective_scan_ref
from bytemamba.ops.scan_cuda import (_BWD_BUILDS, _DTYPE_CODE, _FWD_SMALL, NTHREADS, TL, _aligned, _npad,
                                     _segments)
from helpers import cuda_emu
from helpers.kernel_checks import rel

pytestmark = pytest.mark.skipif(cuda_emu.compiler() is None, reason="needs g++ (C++20) to build the CPU emulation")

WRAPPERS = """
extern "C" void emu_fwd(int emu_agg_pass, int gx, int gy, int smem, FWD_PARAMS) {  // NTHREADS: the build's
  emu::launch(gx, gy, NTHREADS, smem, [&] { if (emu_agg_pass) ss_fwd_agg(FWD_ARGS); else ss_fwd(FWD_ARGS); });
}
extern "C" void emu_fwd_smem(int* out) { ss_fwd_smem(out); }
"""


def _segments_of(nseg, ntiles):
    """The launcher's segment arithmetic (scan_cuda._segments) asked for `nseg` segments: (nseg, tiles a segment)."""
    return _segments(bps_max=nseg, sms=1, channel_blocks=1, ntiles=ntiles)


def _lib(dtype, npad, has_z, has_reset, knobs):
    defines = {"IN_DTYPE": _DTYPE_CODE[dtype], "NPAD": npad, "HAS_Z": int(has_z), "HAS_RESET": int(has_reset),
               "POLY_J": 0, **knobs}
    lib = cuda_emu.build("selective_scan.cu", defines, WRAPPERS)
    lib.emu_fwd.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p] * 14 + [ctypes.c_int, ctypes.c_int, ctypes.c_longlong] \
        + [ctypes.c_int] * 5
    return lib


def emu_forward(ins, knobs, nseg=1):
    """out, final state, checkpoints (batch*dim, ntiles, npad) of the emulated forward."""
    u, delta, A, B, C, D, z, bias, init, reset = (ins[k] for k in ("u", "delta", "A", "B", "C", "D", "z",
                                                                    "delta_bias", "initial_state", "reset"))
    b, d, L = u.shape
    n = A.shape[1]
    npad = _npad(n)
    lib = _lib(u.dtype, npad, z is not None, reset is not None, knobs)
    info = (ctypes.c_int * 3)()
    lib.emu_fwd_smem(info)
    smem, cpb = info[0], info[1]                        # info[2]: threads a block (the wrapper launches NTHREADS)
    dblocks, ntiles = -(-d // cpb), -(-L // TL)
    nseg, seg_tiles = _segments_of(nseg, ntiles)
    out = torch.empty_like(u)
    ckpt = torch.full((b * d, ntiles, npad), float("nan"))
    final = torch.empty(b, d, n)
    agg = torch.empty(max(1, b * d * (nseg - 1) * 2 * npad))
    reset8 = reset.to(torch.uint8).contiguous() if reset is not None else None
    flags = 1 | (2 if _aligned(L, u.element_size(), u, delta, z, B, C, out) else 0) | (8 if _aligned(L, 1, reset8) else 0)
    p = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    args = [p(u), p(delta), p(z), p(B), p(C), p(A), p(D), p(bias), p(init), p(reset8), p(out), p(ckpt), p(final),
            p(agg), b, d, L, n, ntiles, seg_tiles, nseg, flags]
    if nseg > 1:
        lib.emu_fwd(1, b * dblocks, nseg - 1, smem, *args)
    lib.emu_fwd(0, b * dblocks, nseg, smem, *args)
    return out, final, ckpt


def make_inputs(b, d, L, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    low = lambda t: t.to(dtype).contiguous()  # noqa: E731
    return dict(u=low(r(b, d, L)), delta=low(r(b, d, L) * 0.5 - 1.0), A=-torch.exp(r(d, n) * 0.5 + 0.5),
                B=low(r(b, n, L)), C=low(r(b, n, L)), D=r(d), z=low(r(b, d, L)), delta_bias=r(d) * 0.3,
                initial_state=r(b, d, n), reset=torch.rand(b, L, generator=g) < 0.05)


def reference(ins, upto=None):
    """out and final state of the definition in float64 (on the first `upto` positions)."""
    f = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in ins.items()}
    if upto is not None:
        f = {k: (v[..., :upto] if k in ("u", "delta", "B", "C", "z", "reset") else v) for k, v in f.items()}
    return selective_scan_ref(f["u"], f["delta"], f["A"], f["B"], f["C"], f["D"], f["z"], f["delta_bias"],
                              delta_softplus=True, initial_state=f["initial_state"], return_final_state=True,
                              reset=f["reset"])


def _knobs(build):
    """A launcher build's defines ("NAME=VALUE", ...) as {NAME: VALUE}."""
    return dict(d.split("=") for d in build)


FWD_SMALL = _knobs(_FWD_SMALL)     # the launcher's 64-thread build
BUILDS = [{}, FWD_SMALL, {"FWD_CPT": 1}, {"FWD_CPT": 4}]


@pytest.mark.parametrize("knobs", BUILDS, ids=lambda k: "+".join(f"{a}={v}" for a, v in k.items()) or "default")
@pytest.mark.parametrize("shape, nseg", [((2, 70, 200, 16), 1), ((1, 37, 130, 33), 1), ((1, 70, 400, 16), 3)],
                         ids=["partial-block", "npad64", "segments"])
def test_forward_fp32_matches_definition(knobs, shape, nseg):
    ins = make_inputs(*shape, seed=sum(shape))
    out, final, ckpt = emu_forward(ins, knobs, nseg)
    ro, rf = reference(ins)
    assert rel(out, ro) < 2e-5, rel(out, ro)
    assert rel(final, rf) < 2e-5, rel(final, rf)
    b, d, L, n = shape
    for k in range(math.ceil(L / TL)):                  # the state before each tile, as the backward reads it
        want = ins["initial_state"].double() if k == 0 else reference(ins, upto=k * TL)[1]
        got = ckpt[:, k, :n].reshape(b, d, n)
        assert rel(got, want) < 2e-5, (k, rel(got, want))


@pytest.mark.parametrize("knobs", [{}, FWD_SMALL, {"FWD_CPT": 1}],
                         ids=["default", "FWD_NTHR=64+FWD_MINB=4", "FWD_CPT=1"])
@pytest.mark.parametrize("dtype, n", [(torch.bfloat16, 16), (torch.float16, 20)], ids=["bf16", "fp16-npad32"])
def test_forward_low_precision_matches_definition(knobs, dtype, n):
    ins = make_inputs(2, 40, 200, n, dtype=dtype, seed=3)
    out, final, _ = emu_forward(ins, knobs)
    ro, rf = reference(ins)
    assert out.dtype == dtype
    assert rel(out, ro) < 8e-3, rel(out, ro)            # the output's own rounding (bf16 ~2^-9, fp16 ~2^-12)
    assert rel(final, rf) < 2e-5, rel(final, rf)       # states are float32 from the same rounded inputs


# ---- the backward (cuda/scan_bwd.cu: scan_bwd, scan_bwd_agg), mirroring scan_cuda._bwd_impl -----------------------

BWD_WRAPPERS = """
#define EMU_BWD_ARGS u, delta, z, Bm, Cm, A, Dv, bias, reset, dout, ckpt, dfinal, agg, du_o, ddelta_o, dz_o, dB_o, \\
    dC_o, dA_p, dD_p, dbias_p, dinit, batch, dim, L, n, ntiles, seg_tiles, nseg, flags
extern "C" void emu_bwd(int emu_agg_pass, int gx, int gy, int smem, BWD_PARAMS) {
  emu::launch(gx, gy, NTHREADS, smem, [&] { if (emu_agg_pass) scan_bwd_agg(EMU_BWD_ARGS); else scan_bwd(EMU_BWD_ARGS); });
}
extern "C" void emu_bwd_smem(int* out) { scan_bwd_smem(out); }
"""
# The launcher's two builds (scan_cuda._BWD_BUILDS: 3 blocks an SM, 2 blocks an SM).
BWD_BUILDS = [_knobs(_BWD_BUILDS[3]), _knobs(_BWD_BUILDS[2])]


def emu_backward(ins, build, dout, dfinal, nseg=1, deterministic=False):
    """The gradients of <out, dout> + <final, dfinal> from the emulated backward (checkpoints from the emulated
    default forward): {name: gradient}."""
    u, delta, A, B, C, D, z, bias, init, reset = (ins[k] for k in ("u", "delta", "A", "B", "C", "D", "z",
                                                                    "delta_bias", "initial_state", "reset"))
    b, d, L = u.shape
    n = A.shape[1]
    npad = _npad(n)
    _, _, ckpt = emu_forward(ins, {}, 1)
    defines = {"IN_DTYPE": _DTYPE_CODE[u.dtype], "NPAD": npad, "HAS_Z": int(z is not None),
               "HAS_RESET": int(reset is not None), **build}
    lib = cuda_emu.build("scan_bwd.cu", defines, BWD_WRAPPERS)
    lib.emu_bwd.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p] * 22 + [ctypes.c_int, ctypes.c_int,
                                                                          ctypes.c_longlong] + [ctypes.c_int] * 5
    info = (ctypes.c_int * 2)()
    lib.emu_bwd_smem(info)
    smem = info[0]
    dblocks, ntiles = -(-d // (NTHREADS // (npad // 4))), -(-L // TL)
    nseg, seg_tiles = _segments_of(nseg, ntiles)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    part = (dblocks,) if deterministic else ()
    dBp, dCp = torch.zeros(*part, b, n, L), torch.zeros(*part, b, n, L)
    dA_p, dD_p, db_p = torch.empty(nseg, b, d, n), torch.empty(nseg, b, d), torch.empty(nseg, b, d)
    dinit = torch.empty(b, d, n)
    agg = torch.empty(max(1, b * d * (nseg - 1) * 2 * npad))
    reset8 = reset.to(torch.uint8).contiguous() if reset is not None else None
    dout = dout.to(u.dtype).contiguous()
    flags = 1 | (2 if _aligned(L, u.element_size(), u, delta, z, dout, B, C, du, ddelta, dz) else 0) \
        | (0 if deterministic else 4)
    p = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    args = [p(u), p(delta), p(z), p(B), p(C), p(A), p(D), p(bias), p(reset8), p(dout), p(ckpt), p(dfinal), p(agg),
            p(du), p(ddelta), p(dz), p(dBp), p(dCp), p(dA_p), p(dD_p), p(db_p), p(dinit),
            b, d, L, n, ntiles, seg_tiles, nseg, flags]
    if nseg > 1:
        lib.emu_bwd(1, b * dblocks, nseg - 1, smem, *args)
    lib.emu_bwd(0, b * dblocks, nseg, smem, *args)
    return {"u": du, "delta": ddelta, "z": dz, "B": dBp.sum(0) if deterministic else dBp,
            "C": dCp.sum(0) if deterministic else dCp, "A": dA_p.sum((0, 1)), "D": dD_p.sum((0, 1)),
            "delta_bias": db_p.sum((0, 1)), "initial_state": dinit}


def reference_grads(ins, dout, dfinal):
    f = {k: (v.double().requires_grad_(True) if v is not None and v.is_floating_point() else v)
         for k, v in ins.items()}
    out, final = selective_scan_ref(f["u"], f["delta"], f["A"], f["B"], f["C"], f["D"], f["z"], f["delta_bias"],
                                    delta_softplus=True, initial_state=f["initial_state"], return_final_state=True,
                                    reset=f["reset"])
    ((out * dout.double()).sum() + (final * dfinal.double()).sum()).backward()
    return {k: v.grad for k, v in f.items() if v is not None and v.is_floating_point()}


@pytest.mark.parametrize("build", BWD_BUILDS, ids=["3-an-SM", "2-an-SM"])
@pytest.mark.parametrize("shape, nseg, deterministic", [((2, 40, 150, 16), 1, False), ((1, 37, 130, 33), 1, True),
                                                         ((1, 40, 330, 16), 3, True)],
                         ids=["atomics", "npad64-deterministic", "segments"])
def test_backward_fp32_matches_definition(build, shape, nseg, deterministic):
    ins = make_inputs(*shape, seed=sum(shape) + 1)
    g = torch.Generator().manual_seed(7)
    b, d, L, n = shape
    dout, dfinal = torch.randn(b, d, L, generator=g), torch.randn(b, d, n, generator=g)
    got = emu_backward(ins, build, dout, dfinal, nseg, deterministic)
    want = reference_grads(ins, dout, dfinal)
    for k, w in want.items():
        assert rel(got[k], w) < 1e-4, (k, rel(got[k], w))


@pytest.mark.parametrize("build", BWD_BUILDS, ids=["3-an-SM", "2-an-SM"])
def test_backward_bf16_matches_definition(build):
    """2-byte inputs take the 2-an-SM build's cp.async prefetch of the next tile (BWD_PF)."""
    ins = make_inputs(2, 40, 200, 16, dtype=torch.bfloat16, seed=4)
    g = torch.Generator().manual_seed(8)
    dout, dfinal = torch.randn(2, 40, 200, generator=g).bfloat16(), torch.randn(2, 40, 16, generator=g)
    got = emu_backward(ins, build, dout, dfinal)
    want = reference_grads(ins, dout, dfinal)
    for k, w in want.items():                         # du, ddelta, dz are rounded to bf16 (~2^-9)
        assert rel(got[k], w) < (8e-3 if k in ("u", "delta", "z") else 1e-4), (k, rel(got[k], w))
