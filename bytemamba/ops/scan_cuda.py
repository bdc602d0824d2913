"""Selective scan in our own CUDA (forward cuda/selective_scan.cu, backward cuda/scan_bwd.cu), compiled at run
time through CuPy (NVRTC).

    selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        initial_state=None, return_final_state=False, reset=None)

computes exactly `selective_scan_ref` (bytemamba/ops/scan.py) with gradients for every tensor input, the
initial state included. This module owns layout: it checks shapes, dtypes and devices, makes tensors
contiguous, and launches the kernels on PyTorch's current stream with the tensors' own device pointers
(zero copy). The op is registered with ``torch.library`` (``bytemamba::selective_scan_fwd`` /
``bytemamba::selective_scan_bwd``, with fake implementations), so ``torch.compile`` and CUDA-graph capture
see one opaque op each way.

Compilation: one NVRTC compile per specialisation (input dtype, padded state size, z present, reset
present, exp variant) and device architecture, through ``bytemamba.ops._cupy.compile_module``: cached for
the life of the process (``_cupy.compile_times`` records how long each took).

Deterministic mode: by default dB and dC are summed over channel blocks with float32 atomics (fast, the
last bits vary from run to run). ``BYTEMAMBA_DETERMINISTIC=1``, ``set_deterministic(True)`` or
``torch.use_deterministic_algorithms(True)`` switch to per-block partial sums added in a fixed order, so
every run gives the same bits.

Limits: n (d_state) <= 64; any length >= 1 (indices are 64-bit); batch*dim is spread over grid.x, so it
has no 65,535 limit. u, delta, z, B, C in float32, bfloat16 or float16 (if they differ, the kernel works
in float32); A, D, delta_bias float32 (others are upcast); float64 is refused (use backend "ref"/"torch").
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from bytemamba.ops._cupy import compile_module
from bytemamba.ops.scan import BackendError

MAX_STATE = 64
TL = 64          # tile length = checkpoint interval (must match cuda/selective_scan.cu)
NTHREADS = 128

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_deterministic_override: bool | None = None

# Tuning knobs, read once per call (the benchmark sets them to compare variants).
#   BYTEMAMBA_SCAN_POLY : bit mask over the 4 per-thread states whose exp2 runs as a polynomial (FMA pipes)
#   BYTEMAMBA_SCAN_NSEG : force the number of parallel L-segments (0 = automatic)
#   BYTEMAMBA_SCAN_DEFINES : extra compile-time knobs, e.g. "FWD_UNR=8+FWD_MINB=4" (see the .cu header)


class ScanLimitError(BackendError, ValueError):
    """The inputs are outside what the CUDA scan supports (the message names the limit)."""


class ScanDtypeError(BackendError, TypeError):
    """An input dtype the CUDA scan does not take."""


def set_deterministic(flag: bool | None) -> None:
    """Force deterministic backward (True), the fast atomic one (False), or follow the environment (None)."""
    global _deterministic_override
    _deterministic_override = flag


def is_deterministic() -> bool:
    if _deterministic_override is not None:
        return _deterministic_override
    if os.environ.get("BYTEMAMBA_DETERMINISTIC", "0") not in ("", "0", "false", "False"):
        return True
    return torch.are_deterministic_algorithms_enabled()


def _npad(n: int) -> int:
    if n < 1 or n > MAX_STATE:
        raise ScanLimitError(f"selective_scan (cuda): d_state n={n} is not supported; the CUDA scan handles "
                         f"1 <= n <= {MAX_STATE} (use backend 'torch' for larger n)")
    p = 16                      # 16, 32 or 64: smaller n run padded (the block's shared memory fits)
    while p < n:
        p *= 2
    return p


def _variant() -> tuple:
    """Kernel-variant knobs from the environment (for the benchmark): (poly mask, extra -D defines)."""
    poly = int(os.environ.get("BYTEMAMBA_SCAN_POLY", "0"))
    extra = tuple(d for d in os.environ.get("BYTEMAMBA_SCAN_DEFINES", "").replace("+", " ").split() if d)
    return poly, extra


@functools.lru_cache(maxsize=None)
def _load(source: str, opts: tuple, device_index: int, names: tuple, smem_name: str, grow: str = ""):
    """The kernels `names` of `source` compiled with `opts` (``_cupy.compile_module``) with their launch settings,
    worked out once per specialisation: {name: kernel, "smem": the dynamic shared memory a block needs (the
    kernel `smem_name` reports it), "cpb": channels a block (the forward's reports it; 0 where not reported),
    "threads": threads a block (the forward's reports it; NTHREADS where not reported),
    "bps": {name: resident blocks per SM}}. Kernel `grow` may be launched with more shared memory than it
    needs (to cap the blocks an SM)."""
    import cupy

    device = torch.device("cuda", device_index)
    fns = compile_module(source, opts, device, (*names, smem_name))
    with cupy.cuda.Device(device_index):
        size = cupy.zeros(3, dtype=cupy.int32)
        fns[smem_name]((1,), (1,), (size,))
        smem, cpb, threads = (int(v) for v in size.get())
    threads = threads or NTHREADS
    props = torch.cuda.get_device_properties(device)
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    smem_blk = getattr(props, "shared_memory_per_block_optin", 227 * 1024)
    if smem > smem_blk:
        raise RuntimeError(f"selective_scan (cuda): {names[0]} needs {smem} bytes of shared memory, "
                           f"the device allows {smem_blk} per block")
    mod = {"smem": smem, "cpb": cpb, "threads": threads, "bps": {}}
    for name in names:
        k = mod[name] = fns[name]
        if name == grow:
            k.max_dynamic_shared_size_bytes = smem_blk
        elif smem > 48 * 1024:
            k.max_dynamic_shared_size_bytes = smem
        mod["bps"][name] = max(1, min(smem_sm // (smem + 1024), 65536 // (max(1, int(k.num_regs)) * threads), 16))
    return mod


def _spec_opts(dtype_code: int, npad: int, has_z: bool, has_reset: bool) -> tuple:
    return (f"-DIN_DTYPE={dtype_code}", f"-DNPAD={npad}", f"-DHAS_Z={int(has_z)}", f"-DHAS_RESET={int(has_reset)}")


# Two builds of the forward, chosen by the waves (measured on the H200, 2026-11-29, docs/PERF.md "Session 7"):
# 128-thread blocks of 2 channels a thread, 3 blocks an SM (the default; 0.984 / 3.415 / 0.679 / 0.910 ms at the four
# bench shapes), and, where those blocks fill at most 2 of an SM's slots in one wave (the main shape: 256 blocks on
# 132 SMs), 64-thread blocks (4 an SM, by shared memory): half the warps behind each barrier, 0.965 ms there, but 3-6%
# slower at the shapes of several waves. FWD_NTHR / FWD_MINB / FWD_CPT among the extra defines (bench variants) force
# one build.
_FWD_SMALL = ("FWD_NTHR=64", "FWD_MINB=4")


def _grid(b: int, d: int, ntiles: int, cpb: int, bps_max: int, sms: int) -> tuple:
    """A scan kernel's grid (forward or backward): (channel blocks a batch row, L-segments, tiles a segment) for
    blocks of `cpb` channels of which `bps_max` fit an SM."""
    dblocks = -(-d // cpb)
    return (dblocks, *_segments(bps_max, sms, b * dblocks, ntiles))


def _fwd_wants_small(blocks: int, bps_max: int, sms: int) -> bool:
    """The 64-thread build instead of the default: the default's `blocks` are one wave at <= 2 blocks an SM
    while 3 could run."""
    return blocks <= 2 * sms < bps_max * sms


def _fwd_forced() -> bool:
    return any(e.startswith(("FWD_NTHR=", "FWD_MINB=", "FWD_CPT=")) for e in _variant()[1])


def _get_kernels(dtype_code: int, npad: int, has_z: bool, has_reset: bool, device: torch.device, build: tuple = ()):
    """ss_fwd / ss_fwd_agg of one specialisation and build (compiled once per process) with their launch settings."""
    poly, extra = _variant()
    opts = (*_spec_opts(dtype_code, npad, has_z, has_reset), f"-DPOLY_J={poly}",
            *(f"-D{d}" for d in (*build, *extra)))
    return _load("selective_scan.cu", opts, device.index, ("ss_fwd", "ss_fwd_agg"), "ss_fwd_smem")


def _segments(bps_max: int, sms: int, channel_blocks: int, ntiles: int) -> tuple:
    """Parallel L-segments, enough to fill the GPU where batch*dim alone cannot: (nseg, tiles a segment),
    every tile in exactly one segment and none empty (BYTEMAMBA_SCAN_NSEG forces the count)."""
    forced = int(os.environ.get("BYTEMAMBA_SCAN_NSEG", "0"))
    nseg = forced if forced > 0 else max(1, bps_max * sms // channel_blocks)
    nseg = max(1, min(nseg, ntiles, 65535))
    seg_tiles = -(-ntiles // nseg)
    return -(-ntiles // seg_tiles), seg_tiles


def _resident(blocks: int, bps_max: int, sms: int) -> int:
    """Blocks per SM to run with: every block does the same work, so a last wave that is mostly empty
    wastes the GPU; one block fewer per SM can fill whole waves (measured: 3 blocks/SM of the backward are
    ~20% faster per SM than 2, but 512 blocks on 3x132 slots leave the second wave 30% full)."""
    best, best_eff = bps_max, 0.0
    for bps in range(bps_max, max(0, bps_max - 2), -1):
        slots = bps * sms
        waves = -(-blocks // slots)
        eff = blocks / (waves * slots) * (1.0 + 0.2 * (bps - 2))
        if eff > best_eff + 1e-9:
            best, best_eff = bps, eff
    return best


# PyTorch's current stream as a CuPy stream, raw pointers, the SM count: shared with the decode-step launcher.
from bytemamba.ops._cupy import cupy_stream as _cupy_stream  # noqa: E402
from bytemamba.ops._cupy import num_sms as _num_sms  # noqa: E402
from bytemamba.ops._cupy import ptr as _ptr  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Raw launches (tensors already checked, contiguous, on one device).

def _aligned(L: int, elem: int, *ts) -> bool:
    return (L * elem) % 16 == 0 and all(t is None or t.data_ptr() % 16 == 0 for t in ts)


def _fwd_impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reset):
    b, d, L = u.shape
    n = A.shape[1]
    npad = _npad(n)
    dev = u.device
    spec = (_DTYPE_CODE[u.dtype], npad, z is not None, reset is not None, dev)
    K = _get_kernels(*spec)
    sms, ntiles = _num_sms(dev), -(-L // TL)
    dblocks, nseg, seg_tiles = _grid(b, d, ntiles, K["cpb"], K["bps"]["ss_fwd"], sms)
    if _fwd_wants_small(b * dblocks * nseg, K["bps"]["ss_fwd"], sms) and not _fwd_forced():
        K = _get_kernels(*spec, build=_FWD_SMALL)
        dblocks, nseg, seg_tiles = _grid(b, d, ntiles, K["cpb"], K["bps"]["ss_fwd"], sms)

    out = torch.empty_like(u)
    ckpt = torch.empty(b * d * ntiles * npad, device=dev, dtype=torch.float32)
    final = torch.empty(b, d, n, device=dev, dtype=torch.float32)
    agg = torch.empty(max(1, b * d * (nseg - 1) * 2 * npad), device=dev, dtype=torch.float32)
    flags = ((1 if delta_softplus else 0) | (2 if _aligned(L, u.element_size(), u, delta, z, B, C, out) else 0)
             | (8 if _aligned(L, 1, reset) else 0))
    args = (_ptr(u), _ptr(delta), _ptr(z), _ptr(B), _ptr(C), _ptr(A), _ptr(D), _ptr(delta_bias),
            _ptr(initial_state), _ptr(reset), _ptr(out), _ptr(ckpt), _ptr(final), _ptr(agg),
            np.int32(b), np.int32(d), np.int64(L), np.int32(n), np.int32(ntiles), np.int32(seg_tiles),
            np.int32(nseg), np.int32(flags))
    import cupy
    with cupy.cuda.Device(dev.index), _cupy_stream(dev):
        if nseg > 1:
            K["ss_fwd_agg"]((b * dblocks, nseg - 1), (K["threads"],), args, shared_mem=K["smem"])
        K["ss_fwd"]((b * dblocks, nseg), (K["threads"],), args, shared_mem=K["smem"])
    return out, final, ckpt


# ------------------------------------------------------------------------------------------------
# Backward (cuda/scan_bwd.cu). The v5 backward it replaced (ss_bwd in selective_scan.cu) is in git at commit 1e19b9e.

# Two builds of the backward (v6), chosen by the blocks an SM the waves leave (measured on the H200, 2026-11-29
# 12:05 UTC, docs/PERF.md "Backward v6"): where 3 blocks an SM fit and are used, the build capped at 168
# registers with the shuffle dB/dC sums (1-2% faster than v5 there); where 2 (the main shape: 512 blocks), the
# build with up to 255 registers, the shared-memory transpose and a cross-warp flush every 16 positions
# (5.17 ms vs the old v5's 5.70), with two buffers of per-warp sums (one barrier a flush) and a cp.async prefetch of the
# next tile: 4.87 ms (lead's call, 12:47 UTC; that build forced at the other shapes was 3-10% slower than the
# 3-an-SM build chosen there); 4.78 ms since session 8's branch-free finish, 4.71 ms with 16-position sub-blocks
# (BWD_SB=16: the rescan covers 48 of a tile's 64 positions, not 56; 255 registers, spills outside the loops only).
# Any BWD_* define among the extra defines (bench variants) replaces both builds.
_BWD_BUILDS = {3: ("BWD_MINB=3", "BWD_FP=8", "BWD_DBC=0"),
                2: ("BWD_MINB=2", "BWD_FP=16", "BWD_DBC=1", "BWD_PWB=2", "BWD_PF=1", "BWD_SB=16")}


def _get_bwd_kernels(dtype_code: int, npad: int, has_z: bool, has_reset: bool, device: torch.device,
                     build: tuple = ()):
    """scan_bwd / scan_bwd_agg of one specialisation and build (extra -D knobs) with their launch settings."""
    opts = (*_spec_opts(dtype_code, npad, has_z, has_reset), *(f"-D{d}" for d in build + _variant()[1]))
    return _load("scan_bwd.cu", opts, device.index, ("scan_bwd", "scan_bwd_agg"), "scan_bwd_smem", grow="scan_bwd")


def _smem_cap(need: int, bps: int, bps_max: int, smem_sm: int) -> int:
    """Dynamic shared memory to ask for so that at most `bps` blocks share an SM."""
    return need if bps >= bps_max else max(need, smem_sm // (bps + 1) - 1024 + 16)


def _bwd_plan(b: int, d: int, L: int, npad: int, bps_max: int, bs: int, sms: int, smem_sm: int):
    """Grid and residency of the backward (pure arithmetic, testable without a GPU): (channel blocks,
    nseg, seg_tiles, blocks per SM, dynamic shared memory to ask for)."""
    dblocks, nseg, seg_tiles = _grid(b, d, -(-L // TL), NTHREADS // (npad // 4), bps_max, sms)
    bps = _resident(b * dblocks * nseg, bps_max, sms)
    return dblocks, nseg, seg_tiles, bps, _smem_cap(bs, bps, bps_max, smem_sm)


def _bwd_impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reset, dout, ckpt, dfinal,
              need_init: bool, deterministic: bool):
    b, d, L = u.shape
    n = A.shape[1]
    npad = _npad(n)
    dev = u.device
    spec = (_DTYPE_CODE[u.dtype], npad, z is not None, reset is not None, dev)
    forced = any(e.startswith("BWD_") for e in _variant()[1])
    K = _get_bwd_kernels(*spec, build=() if forced else _BWD_BUILDS[3])
    props = torch.cuda.get_device_properties(dev)
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    dblocks, nseg, seg_tiles, bps, smem = _bwd_plan(b, d, L, npad, K["bps"]["scan_bwd"], K["smem"], _num_sms(dev),
                                                    smem_sm)
    if not forced and bps <= 2:
        K2 = _get_bwd_kernels(*spec, build=_BWD_BUILDS[2])
        bps_max = K2["bps"]["scan_bwd"]
        if bps_max >= bps:            # (a build whose buffers fit fewer blocks an SM than planned is not used)
            K = K2
            smem = _smem_cap(K["smem"], bps, bps_max, smem_sm)
    ntiles = -(-L // TL)
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    if deterministic:
        dBp = torch.empty(dblocks, b, n, L, device=dev, dtype=torch.float32)
        dCp = torch.empty(dblocks, b, n, L, device=dev, dtype=torch.float32)
    else:
        dBp = torch.zeros(b, n, L, device=dev, dtype=torch.float32)
        dCp = torch.zeros(b, n, L, device=dev, dtype=torch.float32)
    dA_p = torch.empty(nseg, b, d, n, device=dev, dtype=torch.float32)
    dD_p = torch.empty(nseg, b, d, device=dev, dtype=torch.float32)
    db_p = torch.empty(nseg, b, d, device=dev, dtype=torch.float32)
    dinit = torch.empty(b, d, n, device=dev, dtype=torch.float32) if need_init else None
    agg = torch.empty(max(1, b * d * (nseg - 1) * 2 * npad), device=dev, dtype=torch.float32)
    flags = ((1 if delta_softplus else 0)
             | (2 if _aligned(L, u.element_size(), u, delta, z, dout, B, C, du, ddelta, dz) else 0)
             | (0 if deterministic else 4))
    args = (_ptr(u), _ptr(delta), _ptr(z), _ptr(B), _ptr(C), _ptr(A), _ptr(D), _ptr(delta_bias), _ptr(reset),
            _ptr(dout), _ptr(ckpt), _ptr(dfinal), _ptr(agg), _ptr(du), _ptr(ddelta), _ptr(dz), _ptr(dBp),
            _ptr(dCp), _ptr(dA_p), _ptr(dD_p), _ptr(db_p), _ptr(dinit),
            np.int32(b), np.int32(d), np.int64(L), np.int32(n), np.int32(ntiles), np.int32(seg_tiles),
            np.int32(nseg), np.int32(flags))
    import cupy
    with cupy.cuda.Device(dev.index), _cupy_stream(dev):
        if nseg > 1:
            K["scan_bwd_agg"]((b * dblocks, nseg - 1), (NTHREADS,), args, shared_mem=K["smem"])
        K["scan_bwd"]((b * dblocks, nseg), (NTHREADS,), args, shared_mem=smem)
    dB = dBp.sum(0) if deterministic else dBp
    dC = dCp.sum(0) if deterministic else dCp
    return du, ddelta, dz, dB, dC, dA_p.sum((0, 1)), dD_p.sum((0, 1)), db_p.sum((0, 1)), dinit


# ------------------------------------------------------------------------------------------------
# torch.library registration.

@torch.library.custom_op("bytemamba::selective_scan_fwd", mutates_args=(), device_types="cuda")
def _scan_fwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                 delta_softplus: bool, initial_state: torch.Tensor | None,
                 reset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reset)


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reset):
    b, d, L = u.shape
    n = A.shape[1]
    ntiles = -(-L // TL)
    return (torch.empty_like(u), u.new_empty((b, d, n), dtype=torch.float32),
            u.new_empty((b * d * ntiles * _npad(n),), dtype=torch.float32))


@torch.library.custom_op("bytemamba::selective_scan_bwd", mutates_args=(), device_types="cuda")
def _scan_bwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                 delta_softplus: bool, reset: torch.Tensor | None, dout: torch.Tensor, ckpt: torch.Tensor,
                 dfinal: torch.Tensor | None, need_init: bool, deterministic: bool) -> list[torch.Tensor]:
    du, ddelta, dz, dB, dC, dA, dD, dbias, dinit = _bwd_impl(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, reset, dout, ckpt, dfinal, need_init, deterministic)
    empty = lambda: u.new_empty(0, dtype=torch.float32)  # noqa: E731  (distinct tensors: no aliasing)
    return [du, ddelta, dz if dz is not None else empty(), dB, dC, dA, dD, dbias,
            dinit if dinit is not None else empty()]


@_scan_bwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reset, dout, ckpt, dfinal, need_init, deterministic):
    b, d, L = u.shape
    n = A.shape[1]
    f32 = torch.float32
    empty = lambda: u.new_empty(0, dtype=f32)  # noqa: E731
    return [torch.empty_like(u), torch.empty_like(delta), torch.empty_like(z) if z is not None else empty(),
            u.new_empty((b, n, L), dtype=f32), u.new_empty((b, n, L), dtype=f32), u.new_empty((d, n), dtype=f32),
            u.new_empty((d,), dtype=f32), u.new_empty((d,), dtype=f32),
            u.new_empty((b, d, n), dtype=f32) if need_init else empty()]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, reset = inputs
    _, _, ckpt = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, reset, ckpt)
    ctx.delta_softplus = delta_softplus
    ctx.has_init = initial_state is not None


def _backward(ctx, dout, dfinal, _dckpt):
    u, delta, A, B, C, D, z, delta_bias, reset, ckpt = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    dout = dout.contiguous()
    if dfinal is not None:
        dfinal = dfinal.float().contiguous()
    res = _scan_bwd_op(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, reset, dout, ckpt, dfinal,
                       ctx.has_init, is_deterministic())
    du, ddelta, dz, dB, dC, dA, dD, dbias, dinit = res
    return (du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype),
            dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, None,
            dinit if ctx.has_init else None, None)


_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public entry point: checks and layout.

def _check(u, delta, A, B, C, D, z, delta_bias, initial_state, reset):
    from bytemamba.ops.scan import _check_shapes

    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, reset)
    if u.device.type != "cuda":
        raise BackendError(f"selective_scan (cuda): inputs must be on a CUDA device, got {u.device} "
                           "(use backend 'torch' or 'auto')")
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias), ("initial_state", initial_state), ("reset", reset)):
        if t is not None and t.device != u.device:
            raise BackendError(f"selective_scan (cuda): {name} is on {t.device}, u on {u.device}")
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype not in _DTYPE_CODE:
            raise ScanDtypeError(f"selective_scan (cuda): {name} has dtype {t.dtype}; the CUDA scan takes float32, "
                            "bfloat16 or float16 (use backend 'ref' or 'torch' for float64)")
    _npad(A.shape[-1])
    if u.shape[-1] < 1:
        raise ScanLimitError("selective_scan (cuda): length must be at least 1")
    if u.shape[0] * u.shape[1] == 0:
        raise ScanLimitError("selective_scan (cuda): batch and dim must be at least 1")


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        initial_state=None, return_final_state=False, reset=None):
    """Same signature and result as selective_scan_ref, through our CUDA kernels (differentiable)."""
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state, reset)
    out_dtype = u.dtype
    dts = {t.dtype for t in (u, delta, B, C, z) if t is not None}
    io = dts.pop() if len(dts) == 1 else torch.float32
    cast = lambda t: None if t is None else t.to(io).contiguous()        # noqa: E731
    f32 = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
    rst = None if reset is None else reset.to(torch.bool).contiguous().view(torch.uint8)
    out, final, _ = _scan_fwd_op(cast(u), cast(delta), f32(A), cast(B), cast(C), f32(D), cast(z), f32(delta_bias),
                                 bool(delta_softplus), f32(initial_state), rst)
    out = out.to(out_dtype)
    return (out, final) if return_final_state else out
