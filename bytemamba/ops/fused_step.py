"""One whole decoding step of a small Mamba LM as ONE kernel (cuda/decode_fused.cu): embedding, every layer
(RMSNorm, in_proj, conv step + SiLU, x_proj, dt_proj + softplus + state update + D + z gate, out_proj,
residual add), final norm and head, for the shapes it is compiled for (`SHAPE`: d_model 256, d_inner 512,
d_state 16, dt_rank 16, d_conv 4, 256 symbols; any number of layers and batch rows; bf16 or fp16 compute).
Two kernels: `cluster` (cuda/decode_fused.cu) runs a thread-block cluster of 8 CTAs per batch row, for small
batches; `rows` (cuda/decode_fused_rows.cu) a cluster per tile of 16 rows (24 in the build "r24",
`ROWS_VARIANTS`, where that saves a wave: `rows_variant`; the batch spread over every cluster of its waves:
`rows_per_cluster`), its projections on tensor cores, for large batches (`ROWS_FROM`); see the kernels' opening
comments.

    pack_weights(emb, head, norm_ws, layers, dtype) -> FusedWeights   (stacked once, reused every step)
        layers: one dict per layer with in_proj (2e, d), conv_w (e, k), conv_b (e) or None, x_proj (r+2n, e),
        dt_w (e, r), dt_b (e), A_log (e, n), D (e), out_proj (d, e); norm_ws: every layer's norm weight
        followed by the final norm's; head (V, d); emb (V, d)
    fused_step_fn(ids, W, conv_states, ssm_states, logits=None, kernel=None) -> logits (b, V) float32   (CUDA)
        kernel: "cluster", "rows" or None (choose_kernel(batch))
    fused_step_ref(ids, W, conv_states, ssm_states) -> the same in PyTorch (the definition)
        conv_states[l] (b, e, k-1) and ssm_states[l] (b, e, n) float32, updated in place

Arithmetic: float32, with the projections' inputs and outputs rounded to W.dtype where autocast stores them
(the normed residual, xz, the conv output, x_proj's output, y, out_proj's output, the logits). With
W.dtype == float32 the reference is the PyTorch step of the model in float32 (no rounding).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bytemamba.ops._cupy import compile_module, cupy_stream, ptr

# the one shape the kernel is compiled for: (d_model, d_inner, d_state, dt_rank, d_conv, vocab)
SHAPE = dict(d_model=256, d_inner=512, d_state=16, dt_rank=16, d_conv=4, vocab=256)
NCTA = 8                          # CTAs per cluster (one cluster per batch row)
NTHREADS = 512
_DTYPE_CODE = {torch.bfloat16: 1, torch.float16: 2}


@dataclass
class FusedWeights:
    emb: torch.Tensor         # (V, d) float32
    head: torch.Tensor        # (V, d) dtype
    norm_w: torch.Tensor      # (L + 1, d) float32
    eps: float
    W_in: torch.Tensor        # (L, 2e, d) dtype
    conv_w: torch.Tensor      # (L, e, k) float32
    conv_b: torch.Tensor      # (L, e) float32 (zeros without conv bias)
    W_x: torch.Tensor         # (L, r + 2n, e) dtype
    W_dt: torch.Tensor        # (L, e, r) float32
    dt_b: torch.Tensor        # (L, e) float32
    A: torch.Tensor           # (L, e, n) float32, -exp(A_log)
    D: torch.Tensor           # (L, e) float32
    W_out: torch.Tensor       # (L, d, e) dtype
    rows: object = None       # RowsWeights, the `rows` kernel's layout, built on first use (pack_rows)
    persistent: object = None  # the persistent step's layout (persistent_step.pack_persistent), built on first use

    @property
    def dtype(self) -> torch.dtype:
        return self.W_in.dtype

    @property
    def n_layer(self) -> int:
        return self.W_in.shape[0]


class PackCache:
    """Holds a model's packed weights (stamp, FusedWeights); a copied or pickled model starts empty."""

    def __init__(self):
        self.entry = None

    def __deepcopy__(self, memo):
        return PackCache()

    def __reduce__(self):
        return (PackCache, ())


def unsupported_reason(*, d_model, d_inner, d_state, dt_rank, d_conv, vocab, dtype, biases=False,
                       device=None) -> str | None:
    """None where the fused step applies, else one line saying why not."""
    got = dict(d_model=d_model, d_inner=d_inner, d_state=d_state, dt_rank=dt_rank, d_conv=d_conv, vocab=vocab)
    if got != SHAPE:
        diff = ", ".join(f"{k} {got[k]} (needs {v})" for k, v in SHAPE.items() if got[k] != v)
        return f"fused step: compiled for one shape only: {diff}"
    if dtype not in _DTYPE_CODE:
        return f"fused step: compute dtype {dtype} (needs bfloat16 or float16 autocast)"
    if biases:
        return "fused step: in_proj / out_proj biases are not supported"
    if device is not None:
        if device.type != "cuda":
            return "fused step: needs a CUDA device"
        if torch.cuda.get_device_capability(device) < (9, 0):
            return "fused step: needs thread-block clusters (compute capability 9.0+)"
    return None


def pack_weights(emb, head, norm_ws, layers, eps: float, dtype: torch.dtype) -> FusedWeights:
    """Stack every layer's parameters into the kernel's layout (copies, detached)."""
    f32 = torch.float32
    with torch.no_grad():
        def stack(key, dt, fn=None):
            ts = [(fn(lay[key]) if fn else lay[key]).detach().to(dt) for lay in layers]
            return torch.stack(ts).contiguous()

        e = layers[0]["in_proj"].shape[0] // 2
        conv_b = [lay["conv_b"] if lay["conv_b"] is not None else torch.zeros(e, device=emb.device)
                  for lay in layers]
        return FusedWeights(
            emb=emb.detach().to(f32).contiguous(), head=head.detach().to(dtype).contiguous(),
            norm_w=torch.stack([w.detach().to(f32) for w in norm_ws]).contiguous(), eps=float(eps),
            W_in=stack("in_proj", dtype), conv_w=stack("conv_w", f32, lambda w: w.reshape(w.shape[0], -1)),
            conv_b=torch.stack([b.detach().to(f32) for b in conv_b]).contiguous(),
            W_x=stack("x_proj", dtype), W_dt=stack("dt_w", f32), dt_b=stack("dt_b", f32),
            A=stack("A_log", f32, lambda a: -torch.exp(a.float())), D=stack("D", f32),
            W_out=stack("out_proj", dtype))


# ---- the `rows` kernel's layout ------------------------------------------------------------------------------

K_EL = 2752                       # fp32 constants per (layer, CTA): see cuda/decode_fused_rows.cu


@dataclass
class RowsWeights:
    """The weights sliced per CTA (CTA c: channels 64c..64c+63) and laid out as mma A fragments."""
    Wi: torch.Tensor          # (L, 8, 128 * d) dtype: in_proj rows [x channels | z channels] of each CTA
    Wx: torch.Tensor          # (L, 8, (r + 2n) * 64) dtype: x_proj columns of each CTA
    Wo: torch.Tensor          # (L, 8, d * 64) dtype: out_proj columns of each CTA
    K: torch.Tensor           # (L, 8, K_EL) float32: W_dt^T, A, conv_w, conv_b, dt_b, D, norm weight
    head: torch.Tensor        # (8, 32 * d) dtype: head rows 32c..32c+31
    normf: torch.Tensor       # (d,) float32: the final norm's weight


def mma_fragments(w: torch.Tensor) -> torch.Tensor:
    """(..., M, K) -> (..., M/16 * K/16 * 32 * 8): the A operand of mma.m16n8k16 in fragment order, tiles (m, k)
    row-major, 32 lanes x 8 elements each (lane 4g + t: rows g, g+8 x columns 2t, 2t+1, 2t+8, 2t+9 as
    a0 = (g, 2t..), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..))."""
    *lead, M, K = w.shape
    v = w.reshape(-1, M // 16, 2, 8, K // 16, 2, 4, 2)            # (B, mt, row hi, g, kt, k hi, t, pair)
    return v.permute(0, 1, 4, 3, 6, 5, 2, 7).reshape(*lead, M * K)


def pack_rows(W: FusedWeights) -> RowsWeights:
    """W in the `rows` kernel's layout (copies)."""
    L = W.n_layer
    e, d = SHAPE["d_inner"], SHAPE["d_model"]
    ec = e // NCTA
    with torch.no_grad():
        def per_cta(t):                                          # (L, e, ...) -> (L, 8, 64, ...)
            return t.reshape(L, NCTA, ec, *t.shape[2:])
        xs = W.W_in[:, :e].reshape(L, NCTA, ec, d)
        zs = W.W_in[:, e:].reshape(L, NCTA, ec, d)
        Wi = mma_fragments(torch.cat([xs, zs], dim=2))
        Wx = mma_fragments(W.W_x.reshape(L, -1, NCTA, ec).transpose(1, 2))
        Wo = mma_fragments(W.W_out.reshape(L, d, NCTA, ec).transpose(1, 2))
        K = torch.cat([per_cta(W.W_dt).transpose(2, 3).reshape(L, NCTA, -1), per_cta(W.A).reshape(L, NCTA, -1),
                       per_cta(W.conv_w).reshape(L, NCTA, -1), per_cta(W.conv_b), per_cta(W.dt_b), per_cta(W.D),
                       W.norm_w[:L, None, :].expand(L, NCTA, d)], dim=2).float()
        assert K.shape[2] == K_EL
        head = mma_fragments(W.head.reshape(NCTA, -1, d))
        return RowsWeights(Wi=Wi.contiguous(), Wx=Wx.contiguous(), Wo=Wo.contiguous(), K=K.contiguous(),
                           head=head.contiguous(), normf=W.norm_w[L].contiguous())


# ---- PyTorch reference (the definition) -------------------------------------------------------------------

def fused_step_ref(ids, W: FusedWeights, conv_states, ssm_states):
    dt_ = W.dtype

    def rnd(t):
        return t.to(dt_).float()

    def norm(res, w):
        return res * torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + W.eps) * w

    res = W.emb[ids.long()].float()                                      # (b, d)
    e = W.W_in.shape[1] // 2
    r, n = W.W_dt.shape[2], W.A.shape[2]
    for l in range(W.n_layer):
        h = rnd(norm(res, W.norm_w[l]))
        xz = rnd(h @ W.W_in[l].float().t())
        x, z = xz[:, :e], xz[:, e:]
        cs = conv_states[l]
        window = torch.cat([cs, x[:, :, None]], dim=-1)                  # (b, e, k)
        conv = (window * W.conv_w[l]).sum(-1) + W.conv_b[l]
        cs.copy_(window[..., 1:])
        xc = rnd(F.silu(conv))
        dbl = rnd(xc @ W.W_x[l].float().t())
        dt_low, B, C = dbl[:, :r], dbl[:, r:r + n], dbl[:, r + n:]
        dt = F.softplus(dt_low @ W.W_dt[l].t() + W.dt_b[l])              # (b, e)
        s = ssm_states[l]
        s.mul_(torch.exp(dt[:, :, None] * W.A[l])).add_((dt * xc)[:, :, None] * B[:, None, :])
        y = (s @ C[:, :, None])[..., 0] + W.D[l] * xc
        y = rnd(y * F.silu(z))
        res = res + rnd(y @ W.W_out[l].float().t())
    h = rnd(norm(res, W.norm_w[W.n_layer]))
    return rnd(h @ W.head.float().t())


# ---- CUDA launcher ------------------------------------------------------------------------------------------

def _defines() -> tuple:
    """Extra compile-time defines (benchmark variants), e.g. BYTEMAMBA_FUSED_DEFINES="SYNC_MODE=0"."""
    v = os.environ.get("BYTEMAMBA_FUSED_DEFINES", "")
    return tuple(f"-D{d}" for d in v.replace("+", " ").split() if d)


def check_state(name, t, shape, who="fused step"):
    """A state (or other in-place float32 buffer) a step kernel writes through a raw pointer: contiguous float32
    of `shape`, else one line starting with `who` (also the persistent step's check)."""
    if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{who}: {name} must be a contiguous float32 tensor of shape {tuple(shape)}, "
                         f"got {t.dtype} {tuple(t.shape)} (contiguous={t.is_contiguous()})")


_ptr_tables: dict = {}


def state_table(conv_states, ssm_states, device, who="fused step"):
    """A device int64 table of the states' addresses, built once per set of state buffers (so that a
    captured graph replays it; building it inside a capture would be a host-to-device copy). Also the
    persistent step's (who: the name its error message starts with)."""
    key = (device.index, tuple(t.data_ptr() for t in conv_states), tuple(t.data_ptr() for t in ssm_states))
    t = _ptr_tables.get(key)
    if t is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{who}: first call with these state buffers inside a graph capture "
                               "(run one step eagerly first)")
        if len(_ptr_tables) > 64:
            _ptr_tables.clear()
        t = torch.tensor(list(key[1]) + list(key[2]), dtype=torch.int64, device=device)
        _ptr_tables[key] = t
    return t


def _rows_from() -> int:
    v = os.environ.get("BYTEMAMBA_FUSED_ROWS_FROM")
    return ROWS_FROM if v is None else int(v)


# Batches above this run the `rows` kernel, the others the `cluster` kernel (BYTEMAMBA_FUSED_ROWS_FROM
# overrides it). Both run one CTA per SM in clusters of 8, and an H200 holds 15 such clusters at once: the
# cluster kernel takes ~55 us a wave of 15 rows, the rows kernel ~125 us for 64 rows spread over 13 clusters and
# ~155 us a full wave of 15 x 16 rows (measured, docs/PERF.md "audio6m large batches"), so the rows kernel pays
# from 31 rows on (the cluster kernel's third wave).
ROWS_FROM = 30
ROWS_MAX_LAYERS = 64              # the rows kernel keeps the state pointers in shared memory (MAX_L)

# Builds of the `rows` kernel (name: compile-time defines; the rows a cluster also come from the compiled module):
# "r16" 16 rows a cluster, "r24" 24 (three mma n-tiles: 360 rows a wave on an H200 instead of 240).
# BYTEMAMBA_FUSED_ROWS_VARIANT forces one.
ROWS_VARIANTS = {"r16": (), "r24": ("-DROWS=24",)}
ROWS_OF = {"r16": 16, "r24": 24}
# Time of one full wave (every cluster the GPU holds at once, 15 on an H200) of audio6m's 15 layers, us, measured
# on an H200 (docs/PERF.md, "audio6m large batches", session 8: 146.2 us at 240 rows with r16, 217.7 us at 360 rows
# with r24, kernel alone, 2026-11-29 19:20 UTC): the 24-row build is slower a wave but carries 1.5x the rows, so it
# pays where it saves a wave (an H200: 241..360 rows, one wave instead of two; 721..960 rows r16 again, 4 waves
# against 3). Measured beside the choice in the same run: 360 rows r24 217.7 / r16 259.1, 480 r16 289.7 / r24 328.3,
# 720 r24 422.2 / r16 430.3, 960 r16 571.6 / r24 596.6: the choice was the faster build at each. (The figures before,
# 155 / 225 us, were of older builds; the choices they give differ from these only from 3,601 rows up.)
ROWS_WAVE_US = {"r16": 146.2, "r24": 217.7}


def rows_variant(batch: int | None = None, clusters: int | None = None) -> str:
    """The `rows` build for `batch` rows on a device that holds `clusters` clusters at once: the one with
    the fewer wave-microseconds (ROWS_WAVE_US), r16 on a tie or when either is unknown."""
    v = os.environ.get("BYTEMAMBA_FUSED_ROWS_VARIANT")
    if v and v not in ROWS_VARIANTS:
        raise ValueError(f"fused step: BYTEMAMBA_FUSED_ROWS_VARIANT={v!r} (one of {', '.join(ROWS_VARIANTS)})")
    if v:
        return v
    if not batch or not clusters:
        return "r16"

    def cost(build):
        tiles = -(-batch // ROWS_OF[build])
        waves = -(-tiles // clusters)
        return waves * ROWS_WAVE_US[build]
    return "r24" if cost("r24") < cost("r16") else "r16"


def rows_per_cluster(batch: int, rows: int, clusters: int | None) -> int:
    """The rows a cluster of the `rows` kernel computes (<= rows, the build's tile): the batch spread evenly over
    every cluster of the same number of waves (256 rows at 24 a tile on 15 clusters: 15 tiles of 18 rows, the
    last of 4, instead of 11 of 24; 64 rows at 16: 13 tiles of 5), so that each SM moves fewer rows' states
    (measured on an H200, docs/PERF.md: 64 rows 147 -> 131 us, 256 rows 226 -> 214 us). The full tile where
    the cluster count is unknown or with BYTEMAMBA_FUSED_SPREAD=0."""
    if os.environ.get("BYTEMAMBA_FUSED_SPREAD", "1") == "0" or not clusters:
        return rows
    waves = -(-(-(-batch // rows)) // clusters)
    return min(rows, -(-batch // (waves * clusters)))


def choose_kernel(batch: int, n_layer: int = 1) -> str:
    return "rows" if batch > _rows_from() and n_layer <= ROWS_MAX_LAYERS else "cluster"


def fused_step_fn(ids, W: FusedWeights, conv_states, ssm_states, logits=None, kernel=None):
    dev = W.W_in.device
    if W.dtype not in _DTYPE_CODE:
        raise ValueError(f"fused step: weights of dtype {W.dtype} (needs bfloat16 or float16)")
    b = ids.shape[0]
    L = W.n_layer
    e, n, k = SHAPE["d_inner"], SHAPE["d_state"], SHAPE["d_conv"]
    if len(conv_states) != L or len(ssm_states) != L:
        raise ValueError(f"fused step: {L} layers of weights, {len(conv_states)} / {len(ssm_states)} states")
    for i in range(L):
        check_state(f"conv state {i}", conv_states[i], (b, e, k - 1))
        check_state(f"ssm state {i}", ssm_states[i], (b, e, n))
    ids = ids.to(torch.int64).contiguous()
    if logits is None:
        logits = torch.empty(b, SHAPE["vocab"], device=dev, dtype=torch.float32)
    table = state_table(conv_states, ssm_states, dev)
    kernel = kernel or choose_kernel(b, L)
    if kernel == "rows":
        if L > ROWS_MAX_LAYERS:
            raise ValueError(f"fused step: the rows kernel takes at most {ROWS_MAX_LAYERS} layers, got {L}")
        return _launch_rows(ids, W, table, b, logits)
    if kernel != "cluster":
        raise ValueError(f"fused step: unknown kernel {kernel!r} (cluster or rows)")
    K = compile_module("decode_fused.cu", (f"-DIN_DTYPE={_DTYPE_CODE[W.dtype]}",) + _defines(), dev,
                       ("fused_step",))
    import cupy
    with cupy.cuda.Device(dev.index), cupy_stream(dev):
        K["fused_step"]((NCTA * b,), (NTHREADS,),
                        (ptr(ids), ptr(W.emb), ptr(W.head), ptr(W.norm_w), np.float32(W.eps), ptr(W.W_in),
                         ptr(W.conv_w), ptr(W.conv_b), ptr(W.W_x), ptr(W.W_dt), ptr(W.dt_b), ptr(W.A),
                         ptr(W.D), ptr(W.W_out), ptr(table), np.int32(L), np.int32(b), ptr(logits)))
    return logits


def rows_module(device, dtype, build=None):
    """The compiled `rows` kernel (build: a name of ROWS_VARIANTS, default rows_variant(); plus
    BYTEMAMBA_FUSED_DEFINES), its dynamic shared memory size set and its rows a cluster (K["rows"]) read from
    the module (once per module)."""
    K = compile_module("decode_fused_rows.cu", (f"-DIN_DTYPE={_DTYPE_CODE[dtype]}",)
                       + ROWS_VARIANTS[build or rows_variant()] + _defines(), device,
                       ("fused_step_rows", "fused_rows_smem", "fused_rows_prof"))
    if "smem" not in K:
        import cupy
        with cupy.cuda.Device(device.index):
            out = cupy.zeros(2, dtype=cupy.int32)
            K["fused_rows_smem"]((1,), (1,), (out,))
            smem, rows = (int(v) for v in out.get())
            K["fused_step_rows"].max_dynamic_shared_size_bytes = smem
        K["rows"] = rows
        K["smem"] = smem
    return K


def _launch_rows(ids, W: FusedWeights, table, b, logits):
    dev = W.W_in.device
    if W.rows is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fused step: first `rows` call inside a graph capture (run one step eagerly first)")
        W.rows = pack_rows(W)
    P = W.rows
    clusters = _clusters(dev, W.dtype)
    K = rows_module(dev, W.dtype, rows_variant(b, clusters))
    rpc = rows_per_cluster(b, K["rows"], clusters)
    import cupy
    with cupy.cuda.Device(dev.index), cupy_stream(dev):
        K["fused_step_rows"]((NCTA * ((b + rpc - 1) // rpc),), (NTHREADS,),
                             (ptr(ids), ptr(W.emb), ptr(P.head), ptr(P.normf), np.float32(W.eps), ptr(P.Wi),
                              ptr(P.Wx), ptr(P.Wo), ptr(P.K), ptr(table), np.int32(W.n_layer), np.int32(b),
                              np.int32(rpc), ptr(logits)), shared_mem=K["smem"])
    return logits


_cluster_counts: dict = {}


def _clusters(device, dtype) -> int | None:
    """max_active_clusters of the default build, once per (device, dtype)."""
    key = (device.index, dtype)
    if key not in _cluster_counts:
        _cluster_counts[key] = max_active_clusters(device, dtype)
    return _cluster_counts[key]


def max_active_clusters(device, dtype=torch.bfloat16) -> int | None:
    """How many clusters of the `rows` kernel the device runs at once (cuOccupancyMaxActiveClusters), or None."""
    import ctypes

    from bytemamba.ops._cupy import LaunchConfig, libcuda
    try:
        K = rows_module(device, dtype)
        lib = libcuda()
        n = ctypes.c_int(0)
        cfg = LaunchConfig(NCTA * 64, 1, 1, NTHREADS, 1, 1, K["smem"], None, None, 0)
        rc = lib.cuOccupancyMaxActiveClusters(ctypes.byref(n), ctypes.c_void_p(K["fused_step_rows"].kernel.ptr),
                                              ctypes.byref(cfg))
        return n.value if rc == 0 else None
    except Exception:
        return None
