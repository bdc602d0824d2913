"""The CUDA scan forward (cuda/selective_scan.cu: ss_fwd, ss_fwd_agg, ss_fwd_smem) run on the CPU through the
emulation in tests/helpers/cuda_emu.h, against the reference: its index logic checked where there is no GPU.

Every build the launcher can pick is covered: the default and the candidate knobs (FWD_CPT: channels a thread,
FWD_PAD: padded staging rows), with channel blocks that run past dim, n padded to 16 and to 64, an initial state,
resets, parallel L-segments (the aggregate kernel), fp32 and bf16 inputs. The outputs, the final state and the
checkpoints (the state before each tile, which the backward reads) are compared. The launch sequence mirrors
bytemamba/ops/scan_cuda.py `_fwd_impl`. exp, log and tanh are the C library's here, not MUFU's approximations.
"""

import ctypes
import math

import pytest
import torch

from bytemamba.ops.scan import selective_scan_ref
from helpers import cuda_emu
from helpers.kernel_checks import rel

pytestmark = pytest.mark.skipif(cuda_emu.compiler() is None, reason="needs g++ (C++20) to build the CPU emulation")

TL = 64
WRAPPERS = """
extern "C" void emu_fwd(int emu_agg_pass, int gx, int gy, int smem, FWD_PARAMS) {
  emu::launch(gx, gy, NTHREADS, smem, [&] { if (emu_agg_pass) ss_fwd_agg(FWD_ARGS); else ss_fwd(FWD_ARGS); });
}
extern "C" void emu_fwd_smem(int* out) { ss_fwd_smem(out); }
"""
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


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
    npad = 16 if n <= 16 else 32 if n <= 32 else 64
    lib = _lib(u.dtype, npad, z is not None, reset is not None, knobs)
    info = (ctypes.c_int * 2)()
    lib.emu_fwd_smem(info)
    smem, cpb = info[0], info[1]
    dblocks, ntiles = -(-d // cpb), -(-L // TL)
    seg_tiles = -(-ntiles // nseg)
    nseg = -(-ntiles // seg_tiles)
    out = torch.empty_like(u)
    ckpt = torch.full((b * d, ntiles, npad), float("nan"))
    final = torch.empty(b, d, n)
    agg = torch.empty(max(1, b * d * (nseg - 1) * 2 * npad))
    reset8 = reset.to(torch.uint8).contiguous() if reset is not None else None
    es = u.element_size()
    aligned = (L * es) % 16 == 0 and all(t is None or t.data_ptr() % 16 == 0 for t in (u, delta, z, B, C, out))
    raligned = L % 16 == 0 and (reset8 is None or reset8.data_ptr() % 16 == 0)
    flags = 1 | (2 if aligned else 0) | (8 if raligned else 0)
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


BUILDS = [{}, {"FWD_PAD": 1}, {"FWD_CPT": 2}, {"FWD_CPT": 2, "FWD_PAD": 1}, {"FWD_CPT": 4}]


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


@pytest.mark.parametrize("knobs", [{}, {"FWD_CPT": 2, "FWD_PAD": 1}], ids=["default", "FWD_CPT=2+FWD_PAD=1"])
def test_forward_bf16_matches_definition(knobs):
    ins = make_inputs(2, 40, 200, 16, dtype=torch.bfloat16, seed=3)
    out, final, _ = emu_forward(ins, knobs)
    ro, rf = reference(ins)
    assert out.dtype == torch.bfloat16
    assert rel(out, ro) < 8e-3, rel(out, ro)            # the bf16 rounding of the output, ~2^-9
    assert rel(final, rf) < 2e-5, rel(final, rf)       # states are float32 from the same bf16 inputs
