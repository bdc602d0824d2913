"""The decoding step's projections as skinny tensor-core GEMMs (cuda/decode_gemm.cu), for batches of 2..256 rows.

    gemm_fn(W, x=None, *, bias=None, norm=None, conv=None, resid=None, out_f32=False)

has the keyword interface and semantics of bytemamba.ops.step.gemv_fn (the CUDA-core GEMV, fastest at batch 1):
the RMSNorm prologue from the float32 residual and the previous kernel's partial sums of squares, the conv step +
SiLU epilogue on in_proj's x half, the residual-add epilogue returning new partial sums, a bias, float32 logits.
W (N, K) is streamed from HBM once per tile of up to 64 batch rows and multiplied on the tensor cores
(mma.sync m16n8k16, float32 accumulation); clusters of CTAs split K and sum their tiles through distributed
shared memory. bfloat16 and float16 only: float32 models keep the GEMV / cuBLAS paths (`gemm_unsupported` says
so, in one line). The references are gemv_fn's (tests/ops/test_gemm.py checks both against float64).
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

from bytemamba.ops._cupy import compile_module, ptr
from bytemamba.ops.step import _CT, _check_state, _f32, _LaunchAttr, _LaunchConfig, _rows, pdl

MIN_BATCH, MAX_BATCH = 2, 256
MAX_TILE = 64                    # batch rows per tile (8 n-tiles of the mma): larger batches take several tiles
SMEM_MAX = 112 * 1024            # dynamic shared memory a plan may use (two CTAs can share an SM)
_DTYPE_CODE = {torch.bfloat16: 1, torch.float16: 2}


def gemm_unsupported(batch: int, *widths: int, dtype=torch.bfloat16, device=None) -> str | None:
    """None where gemm_fn runs `batch` rows reduced over each of `widths` (K) in `dtype`, else why not (one line)."""
    if dtype not in _DTYPE_CODE:
        return (f"gemm step (cuda): {dtype} is not supported (bfloat16 / float16 tensor cores); float32 models "
                "keep the GEMV / cuBLAS paths")
    if not MIN_BATCH <= batch <= MAX_BATCH:
        return f"gemm step (cuda): batch {batch} outside {MIN_BATCH}..{MAX_BATCH}"
    for w in widths:
        if w % 32:
            return f"gemm step (cuda): width {w} is not a multiple of 32"
    if device is not None and torch.device(device).type == "cuda" and \
            torch.cuda.get_device_capability(device)[0] < 9:
        return "gemm step (cuda): needs thread-block clusters (compute capability 9.0+)"
    return None


def gemm_supported(batch: int, *widths: int, dtype=torch.bfloat16, device=None) -> bool:
    return gemm_unsupported(batch, *widths, dtype=dtype, device=device) is None


# ---- launch plan ----------------------------------------------------------------------------------------

def batch_tiles(b: int) -> tuple[int, int]:
    """(tiles, n-tiles of 8 rows per tile): the fewest tiles of <= MAX_TILE rows, balanced."""
    tiles = -(-b // MAX_TILE)
    nt = -(-(-(-b // tiles)) // 8)
    return -(-b // (8 * nt)), nt


def _ldx(kK: int) -> int:
    return kK + 32 if kK % 64 == 0 else kK             # rows 64 bytes apart modulo 128 (see the kernel)


def smem_bytes(bn: int, kK: int, wm: int, wk: int, s: int, resid: bool, size: int = 2, epi: int = 1) -> int:
    """Dynamic shared memory of a launch: the input tile and the float32 tiles of the warps (epi 1: beside it,
    the cluster pushes into it while this CTA may still read its input; epi 0: aliasing it), + RESID's
    new residual values."""
    xin, tiles = bn * _ldx(kK) * size, wm * wk * 16 * (bn + 1) * 4
    return (xin + tiles if epi else max(xin, tiles)) + (16 * wm // s * bn * 4 if resid else 0)


_PLAN_FILE: dict = {}


def _parse(text: str, what: str) -> dict:
    t = {}
    for item in filter(None, text.split(",")):
        k, _, v = (p.strip() for p in item.partition("="))
        if k not in ("wm", "wk", "s", "epi") or not v.isdigit() or (int(v) < 1 and k != "epi"):
            raise ValueError(f"{what}: bad item {item!r} (keys wm, wk, s, epi; positive integers, epi 0 / 1)")
        t[k] = int(v)
    return t


def _tune(N: int, K: int, b: int, norm: bool, resid: bool) -> dict:
    """Forced plan items for benchmarks, read at every launch (for a graph: when it is captured):
    BYTEMAMBA_GEMM_TUNE="wm=4,wk=2,s=8,epi=1" for every gemm_fn launch; BYTEMAMBA_GEMM_PLANS=FILE, a JSON
    object {"N,K,batch,norm,resid": "wm=..,wk=..,s=.."} (norm, resid 0 / 1), per shape (the tune env wins)."""
    t = {}
    path = os.environ.get("BYTEMAMBA_GEMM_PLANS", "")
    if path:
        stamp = (path, os.stat(path).st_mtime_ns)
        if _PLAN_FILE.get("stamp") != stamp:
            import json
            with open(path) as fh:
                _PLAN_FILE.update(stamp=stamp, table=json.load(fh))
        t = _parse(_PLAN_FILE["table"].get(f"{N},{K},{b},{int(norm)},{int(resid)}", ""),
                   f"BYTEMAMBA_GEMM_PLANS ({path})")
    t.update(_parse(os.environ.get("BYTEMAMBA_GEMM_TUNE", ""), "BYTEMAMBA_GEMM_TUNE"))
    return t


def plan(N: int, K: int, b: int, norm: bool, resid: bool, sms: int = 132) -> dict:
    """The launch shape: wm x wk warps a CTA (16 wm output rows, K slice split over wk warps), clusters of s CTAs
    splitting K. Chosen by a small cost model (ns; H200 figures): the weights from HBM (~3 TB/s), every CTA's
    weights + input slice through L2 (~6 TB/s in all, ~100 B/ns into one SM), the mma issue (~1 per ns per SM
    with >= 4 warps), one cluster exchange (~0.3 us) and a reload pass per 256 k beyond the first (~0.8 us)."""
    zb, nt = batch_tiles(b)
    bn = 8 * nt
    m16 = -(-N // 16)
    forced = _tune(N, K, b, norm, resid)
    epi = forced.get("epi", 1)
    best = None
    for s in (1, 2, 4, 8):
        for wm in range(1, (8 if "wm" in forced else min(8, m16)) + 1):
            for wk in (1, 2, 4, 8):
                if wm * wk > 8 or K % (32 * s * wk):
                    continue
                if any(k in forced and forced[k] != v for k, v in (("wm", wm), ("wk", wk), ("s", s))):
                    continue
                kK = K // s
                if smem_bytes(bn, kK, wm, wk, s, resid, epi=epi) > SMEM_MAX:
                    continue
                ctas = -(-m16 // wm) * s * zb
                waves = -(-ctas // sms)
                per_cta = 16 * wm * kK * 2 + bn * kK * (4 if norm else 2)
                t = max(N * K * 2 / 3000, ctas * per_cta / 6000, waves * per_cta / 100)
                t += waves * wm * (kK // 16) * nt * max(1.0, 4 / (wm * wk))
                t += (300 if s > 1 else 0) + 800 * (-(-(kK // wk) // 256) - 1)
                if best is None or t < best[0]:
                    best = (t, dict(wm=wm, wk=wk, s=s, epi=epi, nt=nt, zb=zb, ctas=ctas, est_ns=round(t)))
    if best is None:
        raise ValueError(f"gemm (cuda): no launch plan for N {N}, K {K}, batch {b}"
                         + (f" under BYTEMAMBA_GEMM_TUNE {forced}" if forced else ""))
    return best[1]


# ---- launcher -------------------------------------------------------------------------------------------

_libcuda = None
_SMEM_SET: set = set()


def _kernel(dtype: torch.dtype, nt: int, epi: int, device: torch.device):
    fn = compile_module("decode_gemm.cu", (f"-DIN_DTYPE={_DTYPE_CODE[dtype]}", f"-DNT={nt}", f"-DEPI={epi}"), device,
                        ("gemm_step",))["gemm_step"]
    if id(fn) not in _SMEM_SET:                   # once per compiled module: allow up to SMEM_MAX bytes
        fn.max_dynamic_shared_size_bytes = SMEM_MAX
        _SMEM_SET.add(id(fn))
    return fn


def _launch(device, fn, grid, block, cluster_s, args, smem, batch):
    """cuLaunchKernelEx on PyTorch's stream: a (1, s, 1) cluster when s > 1, programmatic dependent launch
    where bytemamba.ops.step.pdl(batch) says so."""
    global _libcuda
    if _libcuda is None:
        _libcuda = ctypes.CDLL("libcuda.so.1")
        _libcuda.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                              ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    vals = [_CT[type(a)](a.item()) for a in args]
    params = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
    attrs = []
    if cluster_s > 1:
        a = _LaunchAttr(id=4)                     # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION: (x, y, z)
        a.value[0], a.value[1], a.value[2] = 1, cluster_s, 1
        attrs.append(a)
    if pdl(batch):
        a = _LaunchAttr(id=6)                     # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        a.value[0] = 1
        attrs.append(a)
    arr = (_LaunchAttr * max(1, len(attrs)))(*attrs)
    cfg = _LaunchConfig(grid[0], grid[1], grid[2], block, 1, 1, smem, torch.cuda.current_stream(device).cuda_stream,
                        ctypes.cast(arr, ctypes.POINTER(_LaunchAttr)), len(attrs))
    import cupy
    with cupy.cuda.Device(device.index):
        rc = _libcuda.cuLaunchKernelEx(ctypes.byref(cfg), fn.kernel.ptr, params, None)
    if rc != 0:
        raise RuntimeError(f"gemm (cuda): cuLaunchKernelEx failed with CUresult {rc} (grid {grid}, block {block}, "
                           f"cluster {cluster_s}, {smem} bytes of shared memory)")


def gemm_fn(W, x=None, *, bias=None, norm=None, conv=None, resid=None, out_f32=False):
    """Fused step GEMM y = in @ W^T (+ bias) for b rows, W (N, K) contiguous bf16 / fp16: gemv_fn's options.

    in:  `x` (b, K) rows (last dim contiguous, rows 16-byte aligned), or `norm=(residual (b, K) f32, partial
         (b, P) f32, norm_w (K) f32, eps)`: RMSNorm(residual) * norm_w, rounded to W's dtype, with the mean
         square taken from the partial sums.
    out: (b, N) in W's dtype (float32 with out_f32); `conv=(conv_state (b, e, k-1), w (e, k), bias (e))`
         turns the first e = N/2 outputs into the conv step + SiLU of in_proj's x half;
         `resid=(residual (b, N) f32)` adds y to the residual in place and returns the new partial sums of
         squares (b, P_out) instead of y (P_out: one per block of output rows).
    """
    N, K = W.shape
    dev, io = W.device, W.dtype
    flags = 0
    xs = np.int64(0)
    res_in = partial_in = nw = None
    P_in, eps = 0, 0.0
    if norm is not None:
        res_in, partial_in, nw, eps = norm
        b = res_in.shape[0]
        _check_state("residual", res_in, (b, K))
        if partial_in.dtype != torch.float32 or partial_in.dim() != 2 or partial_in.shape[0] != b:
            raise ValueError(f"gemm (cuda): partial sums must be float32 ({b}, P), got {partial_in.dtype} "
                             f"{tuple(partial_in.shape)}")
        partial_in = partial_in.contiguous()
        nw = _f32(nw)
        if nw.numel() != K:
            raise ValueError(f"gemm (cuda): norm weight has {nw.numel()} elements, K is {K}")
        P_in = partial_in.shape[1]
        flags |= 1
    else:
        if x is None:
            raise ValueError("gemm (cuda): give x or norm=")
        b = x.shape[0]
        x, xs = _rows("x", x, b, K)
        if x.dtype != io:
            raise TypeError(f"gemm (cuda): x has dtype {x.dtype}, W has {io}")
    why = gemm_unsupported(b, K, dtype=io, device=dev)
    if why:
        raise ValueError(why)
    if W.dim() != 2 or W.stride(1) != 1 or W.stride(0) != K:
        raise ValueError(f"gemm (cuda): W must be a contiguous (N, K) matrix, got strides {tuple(W.stride())}")
    if x is not None and (x.data_ptr() % 16 or int(xs) % 8):
        raise ValueError("gemm (cuda): input rows must start on 16-byte boundaries")
    p = plan(N, K, b, norm is not None, resid is not None,
             torch.cuda.get_device_properties(dev).multi_processor_count)
    wm, wk, s, nt, zb, epi = p["wm"], p["wk"], p["s"], p["nt"], p["zb"], p["epi"]
    mb = -(-N // (16 * wm))
    out = partial_out = res_out = None
    cstate = cw = cb = None
    e = kc = 0
    os_ = np.int64(N)
    P_out = 0
    if resid is not None:
        res_out = resid
        _check_state("residual", res_out, (b, N))
        partial_out = torch.empty(b, mb, device=dev, dtype=torch.float32)
        P_out = mb
        flags |= 4
    else:
        out = torch.empty(b, N, device=dev, dtype=torch.float32 if out_f32 else io)
        if out_f32:
            flags |= 8
        if conv is not None:
            cstate, cw, cb = conv
            if N % 2:
                raise ValueError(f"gemm (cuda): conv= needs an even N (x and z halves), got {N}")
            e = N // 2
            cw = _f32(cw.reshape(cw.shape[0], -1))
            kc = cw.shape[1]
            if kc < 2 or cw.shape[0] != e:
                raise ValueError(f"gemm (cuda): conv weight must be ({e}, k >= 2), got {tuple(cw.shape)}")
            _check_state("conv_state", cstate, (b, e, kc - 1))
            flags |= 2
    kK = K // s
    smem = smem_bytes(8 * nt, kK, wm, wk, s, resid is not None, W.element_size(), epi)
    _launch(dev, _kernel(io, nt, epi, dev), (mb, s, zb), 32 * wm * wk, s,
            (ptr(W), ptr(_f32(bias)), np.int32(N), np.int32(K), ptr(x), xs, ptr(res_in), ptr(partial_in),
             np.int32(P_in), ptr(nw), np.float32(eps), ptr(out), os_, ptr(cstate), ptr(cw), ptr(_f32(cb)),
             np.int32(e), np.int32(kc), ptr(res_out), ptr(partial_out), np.int32(P_out), np.int32(b),
             np.int32(wm), np.int32(wk), np.int32(s), np.int32(_ldx(kK)), np.int32(flags)), smem, b)
    return partial_out if resid is not None else out
