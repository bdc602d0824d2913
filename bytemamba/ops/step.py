"""One decoding step of the Mamba mixer: the causal-conv state update and the selective state update, plus
the residual add + RMSNorm between layers. Each op has a CUDA launcher (`*_fn`, cuda/decode_step.cu through
CuPy/NVRTC, on PyTorch's current stream, so a captured CUDA graph replays it) and a PyTorch reference of
the same signature (`*_ref`, the definition; MambaMixer.step's PyTorch path runs exactly these).

    conv_state_update(x, conv_state, weight, bias=None, silu=True) -> (b, e)
        x (b, e); conv_state (b, e, k-1) float32, updated in place; weight (e, k) (or (e, 1, k)); bias (e)
    ssm_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_proj_weight=None) -> (b, e) in x's dtype
        state (b, e, n) float32, updated in place; x, z (b, e); dt (b, e), or (b, r) with dt_proj_weight
        (e, r) (then dt = dt @ dt_proj_weight^T, the low-rank dt projection); A (e, n); B, C (b, n);
        D, dt_bias (e)
    add_rmsnorm(residual, delta, weight, eps, out_dtype, ids=None, embedding=None) -> (b, d) out_dtype
        residual (b, d) float32, updated in place: residual += delta (or = embedding[ids]); returns
        rmsnorm(residual) * weight

The CUDA launchers take activations in float32, bfloat16 or float16 (rows may be strided views, the last
dimension contiguous), states and small parameters in float32. They do no autograd (decoding only).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from bytemamba.ops.scan import BackendError
from bytemamba.ops._cupy import LAUNCH_PDL, compile_module, cupy_stream, launch_ex, num_sms, ptr

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_SSM_ROWS = (1, 2, 4)            # ssm_step_r<ROWS>: batch rows per block (template instances in the .cu)
_KERNELS = ("conv_step", "add_rmsnorm", "gemv_step", "embed_rows", "sample_rows",
            *(f"ssm_step_r{k}" for k in _SSM_ROWS))
MAXB = 8                      # the fused GEMVs take batch rows in tiles of up to this (GB in cuda/decode_step.cu)
MAX_STATE = 128


# ---- PyTorch references (the definition) -------------------------------------------------------------

def conv_state_update_ref(x, conv_state, weight, bias=None, silu=True):
    w = weight.reshape(weight.shape[0], -1)
    window = torch.cat([conv_state.to(x.dtype), x[:, :, None]], dim=-1)        # (b, e, k)
    out = (window * w.to(x.dtype)).sum(-1)
    if bias is not None:
        out = out + bias.to(x.dtype)
    conv_state.copy_(window[..., 1:])
    return F.silu(out) if silu else out


def ssm_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                         dt_proj_weight=None):
    if dt_proj_weight is not None:
        # in dt's dtype, as the module's dt_proj runs (autocast casts its weight the same way)
        dt = F.linear(dt, dt_proj_weight.to(dt.dtype),
                      None if dt_bias is None else dt_bias.to(dt.dtype)).float()  # (b, e), bias included
    else:
        dt = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    xf = x.float()
    dA = torch.exp(dt[:, :, None] * A.float())                                  # (b, e, n)
    state.mul_(dA).add_((dt * xf)[:, :, None] * B.float()[:, None, :])
    y = (state @ C.float()[:, :, None])[..., 0]
    if D is not None:
        y = y + D.float() * xf
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def add_rmsnorm_ref(residual, delta, weight, eps, out_dtype, ids=None, embedding=None):
    if ids is not None:
        residual.copy_(embedding[ids.long()].float())
    elif delta is not None:
        residual.add_(delta.float())
    xf = residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(out_dtype)


# ---- CUDA launchers -----------------------------------------------------------------------------------

def _kernels(dtype: torch.dtype, n: int, device: torch.device, gb: int = 0):
    """The module for activations of `dtype`, d_state `n` (ssm_step) and, for gemv_step, batch `gb`."""
    if dtype not in _DTYPE_CODE:
        raise BackendError(f"decode step (cuda): activations of dtype {dtype} are not supported "
                           "(float32, bfloat16, float16)")
    if not 1 <= n <= MAX_STATE:
        raise BackendError(f"decode step (cuda): d_state {n} is not supported (1..{MAX_STATE})")
    t = tuning()
    opts = (f"-DIN_DTYPE={_DTYPE_CODE[dtype]}", f"-DNSTATE={n}", f"-DGB={max(gb, 1)}",
            f"-DRPW={t['rpw']}", f"-DUK={t['uk']}")
    return compile_module("decode_step.cu", opts, device, _KERNELS)


# measured on the H200 (docs/PERF.md, decoding): gemv_blocks 132 beat 264 (byte353m b 1); ssm_rows None: chosen
# per (batch, channels) by ssm_rows() (docs/PERF.md, "ssm_step v4")
_TUNING = dict(ssm_rows=None, rpw=2, uk=4, gemv_blocks=132)


def tuning() -> dict:
    """Launch shapes of the step kernels: ssm_rows (batch rows per ssm_step block: 1, 2 or 4; None: ssm_rows()
    picks it per shape), rpw / uk (gemv_step: output
    rows per warp, 16-byte weight chunks per lane per row in flight), gemv_blocks (gemv_step splits K over
    more warps until it has this many blocks). BYTEMAMBA_STEP_TUNE="ssm_rows=2,uk=8" overrides them (for
    benchmarks); read at every launch (for a graph: when it is captured)."""
    t = dict(_TUNING)
    for item in filter(None, os.environ.get("BYTEMAMBA_STEP_TUNE", "").split(",")):
        k, _, v = (p.strip() for p in item.partition("="))
        if k not in t or not v.isdigit() or int(v) < 1:
            raise ValueError(f"BYTEMAMBA_STEP_TUNE: bad item {item!r} (keys {', '.join(t)}; positive integers)")
        t[k] = int(v)
    return t


def v2_kernels() -> bool:
    """The fused sampler (sample_rows: 2 launches instead of ~20, its own random stream) in the decoder, on by
    default; BYTEMAMBA_STEP_V2=0 selects the PyTorch sampler (sample_next, torch.multinomial's stream).
    Read when a decoder is built."""
    return os.environ.get("BYTEMAMBA_STEP_V2", "1") not in ("", "0", "false", "False")


def pdl(batch: int) -> bool:
    """Whether the step kernels of this batch size launch with programmatic dependent launch (sm_90+): each
    may start, and load its weights, while the previous kernel finishes. By default at batch 1 only (measured
    on the H200: byte353m b 1 0.963 -> 0.848 ms a step; audio6m b 1 fused step 60.7 -> 59.5 us; but byte353m b 8
    on the cuBLAS path 1.529 -> 1.604 ms, b 64 and audio6m b 256 2-4% slower; docs/PERF.md run F);
    BYTEMAMBA_STEP_PDL=1 / 0 turns it on / off at every batch."""
    env = os.environ.get("BYTEMAMBA_STEP_PDL", "")
    if env == "":
        return batch == 1
    return env not in ("0", "false", "False")


def _rows(name, t, shape0, width):
    """(t, row stride): a (rows, width) input whose last dimension is contiguous (copied if it is not;
    strided rows, such as the x and z halves of in_proj's output, are taken as they are)."""
    if t.dim() != 2 or t.shape[0] != shape0 or t.shape[1] != width:
        raise ValueError(f"decode step (cuda): {name} must be ({shape0}, {width}), got {tuple(t.shape)}")
    if t.stride(1) != 1 and width > 1:
        t = t.contiguous()
    return t, np.int64(t.stride(0) if shape0 > 1 else width)


def _f32(t):
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _aligned(t):
    """t itself when it starts on a 16-byte boundary (ssm_step reads W_dt and A rows as float4), else a copy."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _check_state(name, t, shape):
    if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != tuple(shape):
        raise ValueError(f"decode step (cuda): {name} must be a contiguous float32 tensor of shape "
                         f"{tuple(shape)}, got {t.dtype} {tuple(t.shape)} (contiguous={t.is_contiguous()})")


def _launch(device, fn, grid, block, args, smem: int = 0, batch: int = 1):
    grid = grid if isinstance(grid, tuple) else (grid,)
    if pdl(batch) and torch.cuda.get_device_capability(device)[0] >= 9:
        return launch_ex(device, fn, grid, block, args, smem, (LAUNCH_PDL,), "decode step (cuda)")
    import cupy
    with cupy.cuda.Device(device.index), cupy_stream(device):
        fn(grid, (block,), args, shared_mem=smem)


def conv_state_update_fn(x, conv_state, weight, bias=None, silu=True):
    b, e = x.shape
    w = _f32(weight.reshape(weight.shape[0], -1))
    k = w.shape[1]
    if k < 2:
        raise BackendError("decode step (cuda): the conv kernel must have at least 2 taps (d_conv >= 2); "
                           "use scan backend 'torch' or 'auto'")
    x, xs = _rows("x", x, b, e)
    _check_state("conv_state", conv_state, (b, e, k - 1))
    K = _kernels(x.dtype, 1, x.device)
    out = torch.empty(b, e, device=x.device, dtype=x.dtype)
    _launch(x.device, K["conv_step"], -(-b * e // 256), 256,
            (ptr(x), xs, ptr(conv_state), ptr(w), ptr(_f32(bias)), ptr(out), np.int32(b), np.int32(e),
             np.int32(k), np.int32(1 if silu else 0)), batch=b)
    return out


def _ssm_lanes(n: int) -> int:
    """Lanes per channel in ssm_step (LPC): the states padded to a power of two >= 4, 4 a lane."""
    npads = 4
    while npads < n:
        npads *= 2
    return npads // 4


_SSM_SMEM = 48 * 1024            # ssm_step's shared memory (static + dynamic) within the default limit


def _ssm_rank_pad(n: int, r: int) -> int:
    """dt ranks padded to whole chunks of the lanes of a channel (the dt rows' stride in shared memory)."""
    lpc = _ssm_lanes(n)
    return -(-r // (4 * lpc)) * 4 * lpc


def _ssm_smem(rows: int, n: int, rp: int) -> tuple[int, int]:
    """(dynamic, total) shared memory bytes of ssm_step_r<rows>: the dt rows; B, C; x, z, dt per channel."""
    lpc = _ssm_lanes(n)
    dyn = rows * rp * 4
    return dyn, dyn + rows * lpc * 4 * 4 * 2 + rows * (128 // lpc) * 4 * 3


def ssm_rows(b: int, e: int, n: int, r: int, device) -> int:
    """Batch rows per ssm_step block (kernel ssm_step_r<rows>) for a batch b, e channels, d_state n, dt rank r
    (0: full-rank dt): tuning()["ssm_rows"] where set, else 1 row a block while that gives at most 4 blocks of
    128 threads per SM, 2 rows beyond (measured on the H200 at every batch 1..256 of byte353m / audio6m,
    docs/PERF.md "ssm_step v4": more rows per block cost registers and warps, and were slower)."""
    lpc = _ssm_lanes(n)
    rp = _ssm_rank_pad(n, r)
    if _ssm_smem(1, n, rp)[1] > _SSM_SMEM:
        raise BackendError(f"decode step (cuda): dt_rank {r} is too large for ssm_step")
    rows = tuning()["ssm_rows"]
    if rows is None:
        rows = 1 if -(-e // (128 // lpc)) * b <= 4 * num_sms(device) else 2
        if _ssm_smem(rows, n, rp)[1] > _SSM_SMEM:               # a large dt rank: 1 row a block fits (above)
            rows = 1
    if rows not in _SSM_ROWS or _ssm_smem(rows, n, rp)[1] > _SSM_SMEM:
        raise ValueError(f"BYTEMAMBA_STEP_TUNE: ssm_rows={rows} is not one of {_SSM_ROWS} or needs more than "
                         f"{_SSM_SMEM} bytes of shared memory at d_state {n}, dt_rank {r}")
    return rows


def ssm_state_update_fn(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                        dt_proj_weight=None):
    b, e = x.shape
    n = A.shape[-1]
    _check_state("state", state, (b, e, n))
    io = x.dtype
    for name, t in (("dt", dt), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype != io:
            raise TypeError(f"decode step (cuda): {name} has dtype {t.dtype}, x has {io}")
    x, xs = _rows("x", x, b, e)
    wdt = None
    if dt_proj_weight is not None:
        wdt = _aligned(_f32(dt_proj_weight))
        r = wdt.shape[1]
        dt, dts = _rows("dt", dt, b, r)
    else:
        r = 0
        dt, dts = _rows("dt", dt, b, e)
    B, bs = _rows("B", B, b, n)
    C, cs = _rows("C", C, b, n)
    z, zs = _rows("z", z, b, e) if z is not None else (None, np.int64(0))
    lpc = _ssm_lanes(n)
    rows = ssm_rows(b, e, n, r, x.device)
    y = torch.empty(b, e, device=x.device, dtype=io)
    _launch(x.device, _kernels(io, n, x.device)[f"ssm_step_r{rows}"], (-(-e // (128 // lpc)), -(-b // rows)), 128,
            (ptr(state), ptr(x), xs, ptr(dt), dts, ptr(wdt), np.int32(r), ptr(_f32(dt_bias)), ptr(_aligned(_f32(A))),
             ptr(B), bs, ptr(C), cs, ptr(_f32(D)), ptr(z), zs, ptr(y), np.int32(b), np.int32(e),
             np.int32(1 if dt_softplus else 0)), smem=_ssm_smem(rows, n, _ssm_rank_pad(n, r))[0], batch=b)
    return y


def add_rmsnorm_fn(residual, delta, weight, eps, out_dtype, ids=None, embedding=None):
    b, d = residual.shape
    _check_state("residual", residual, (b, d))
    if delta is not None and (delta.dtype != out_dtype or not delta.is_contiguous()):
        delta = delta.to(out_dtype).contiguous()
    if ids is not None:
        ids = ids.to(torch.int64).contiguous()
        embedding = _f32(embedding)
    K = _kernels(out_dtype, 1, residual.device)
    out = torch.empty(b, d, device=residual.device, dtype=out_dtype)
    _launch(residual.device, K["add_rmsnorm"], b, 256,
            (ptr(residual), ptr(delta), ptr(ids), ptr(embedding), ptr(_f32(weight)), ptr(out), np.int32(d),
             np.float32(eps)), batch=b)
    return out


# ---- small batches: fused GEMVs (no autograd, decoding only) ------------------------------------------

_SMEM = 48 * 1024                # gemv_step stages the (b, K) input rows in (static-limit) shared memory


def gemv_supported(batch: int, *widths: int, dtype=torch.bfloat16) -> bool:
    """True where the fused GEMV path applies: every reduced width a multiple of 16 bytes, and a tile of
    min(batch, MAXB) rows of it within 48 KB (the rows are staged in shared memory)."""
    size = torch.empty((), dtype=dtype).element_size()
    gb = min(batch, MAXB)
    return batch >= 1 and all(w % (16 // size) == 0 and gb * w * size <= _SMEM for w in widths)


def _split_k(N: int, K: int, vec: int, t: dict) -> int:
    """Warps sharing an output row group (gemv_step's kw): the fewest that give gemv_blocks blocks."""
    kw = 1
    while kw < 8 and -(-N // (t["rpw"] * 8 // kw)) < t["gemv_blocks"] and K % (2 * kw * vec) == 0:
        kw *= 2
    return kw


def gemv_fn(W, x=None, *, bias=None, norm=None, conv=None, resid=None, out_f32=False):
    """Fused GEMV y = in @ W^T (+ bias) for b rows (tiles of MAXB), W (N, K) contiguous in the activation dtype.

    in:  `x` (b, K) rows (last dim contiguous, rows 16-byte aligned), or `norm=(residual (b, K) f32, partial
         (b, P) f32, norm_w (K) f32, eps)`: RMSNorm(residual) * norm_w, rounded to W's dtype, with the mean
         square taken from the partial sums.
    out: (b, N) in W's dtype (float32 with out_f32); `conv=(conv_state (b, e, k-1), w (e, k), bias (e))`
         turns the first e = N/2 outputs into the conv step + SiLU of in_proj's x half;
         `resid=(residual (b, N) f32)` adds y to the residual in place and returns the new partial sums of
         squares (b, P_out) instead of y.
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
        partial_in = partial_in.contiguous()
        nw = _f32(nw)
        P_in = partial_in.shape[1]
        flags |= 1
    else:
        b = x.shape[0]
        x, xs = _rows("x", x, b, K)
        if x.dtype != io:
            raise TypeError(f"gemv (cuda): x has dtype {x.dtype}, W has {io}")
    vec = 16 // W.element_size()
    if not gemv_supported(b, K, dtype=io) or W.stride(1) != 1 or W.stride(0) != K:
        raise ValueError(f"gemv (cuda): batch {b} / width {K} / layout not supported")
    if x is not None and (x.data_ptr() % 16 or int(xs) % vec):
        raise ValueError("gemv (cuda): input rows must start on 16-byte boundaries")
    t = tuning()
    kw = _split_k(N, K, vec, t)
    grid = -(-N // (t["rpw"] * 8 // kw))
    gb = min(b, MAXB)
    out = partial_out = res_out = None
    cstate = cw = cb = None
    e = kc = 0
    os = np.int64(N)
    P_out = 0
    if resid is not None:
        res_out = resid
        _check_state("residual", res_out, (b, N))
        partial_out = torch.empty(b, grid, device=dev, dtype=torch.float32)
        P_out = grid
        flags |= 4
    else:
        out = torch.empty(b, N, device=dev, dtype=torch.float32 if out_f32 else io)
        if out_f32:
            flags |= 8
        if conv is not None:
            cstate, cw, cb = conv
            e = N // 2
            cw = _f32(cw.reshape(cw.shape[0], -1))
            kc = cw.shape[1]
            _check_state("conv_state", cstate, (b, e, kc - 1))
            flags |= 2
    _launch(dev, _kernels(io, 1, dev, gb)["gemv_step"], (grid, -(-b // gb)), 256,
            (ptr(W), ptr(_f32(bias)), np.int32(N), np.int32(K), ptr(x), xs, ptr(res_in), ptr(partial_in),
             np.int32(P_in), ptr(nw), np.float32(eps), ptr(out), os, ptr(cstate), ptr(cw), ptr(_f32(cb)),
             np.int32(e), np.int32(kc), ptr(res_out), ptr(partial_out), np.int32(P_out), np.int32(b),
             np.int32(kw), np.int32(flags)), smem=gb * K * W.element_size(), batch=b)
    return partial_out if resid is not None else out


def embed_rows_fn(ids, embedding, residual):
    """residual (b, d) f32 <- embedding[ids]; returns the partial sums of squares (b, 1) for gemv_fn(norm=)."""
    b, d = residual.shape
    _check_state("residual", residual, (b, d))
    ids = ids.to(torch.int64).contiguous()
    partial = torch.empty(b, 1, device=residual.device, dtype=torch.float32)
    _launch(residual.device, _kernels(torch.float32, 1, residual.device)["embed_rows"], b, 256,
            (ptr(ids), ptr(_f32(embedding)), ptr(residual), ptr(partial), np.int32(d)), batch=b)
    return partial


def sample_fn(logits, temperature: float, top_k: int, top_p: float, min_p: float, seed, counter, symbols, logp):
    """The fused sampler (opt-in v2, cuda/decode_step.cu sample_rows): logits (b, V <= 1024) float32 ->
    symbols (b,) int64 written in place, logp (b,) float64 += log_softmax(logits)[symbol]. Temperature, top-k,
    top-p and min-p as bytemamba.generate.filter_probs; the random draw from a hash of (seed, counter, row,
    symbol), seed and counter being one-element int64 device tensors (advance the counter between steps)."""
    b, V = logits.shape
    if V > 1024:
        raise BackendError(f"sample (cuda): at most 1024 symbols, got {V}")
    logits = logits.float().contiguous()
    _launch(logits.device, _kernels(torch.float32, 1, logits.device)["sample_rows"], b, 256,
            (ptr(logits), np.int32(V), np.float32(temperature), np.int32(top_k), np.float32(top_p),
             np.float32(min_p), ptr(seed), ptr(counter), ptr(symbols), ptr(logp)), batch=b)
    return symbols


class CastCache:
    """Parameters cast (or transformed) once for decoding and reused step after step; an entry is redone
    when its parameter changes (new storage or an in-place update, seen through the version counter).
    Casting inside every step would add a kernel per weight per step, and inside a captured graph it would
    be replayed each time."""

    def __init__(self):
        self._d: dict = {}

    def __deepcopy__(self, memo):            # a copied or pickled model starts with an empty cache
        return CastCache()

    def __reduce__(self):
        return (CastCache, ())

    def get(self, t: torch.Tensor | None, dtype: torch.dtype, tag: str = "", fn=None):
        if t is None:
            return None
        key = (id(t), dtype, tag)
        stamp = (t.data_ptr(), t._version, t.device)
        hit = self._d.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        with torch.no_grad():
            v = t.detach() if fn is None else fn(t.detach())
            v = v.to(dtype).contiguous()
        self._d[key] = (stamp, v)
        return v
