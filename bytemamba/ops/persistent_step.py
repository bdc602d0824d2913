"""Every layer of one decoding step of a byte353m-shaped Mamba LM as ONE persistent kernel
(cuda/decode_persistent.cu): 128 CTAs, one per SM, in clusters of 2 (a pair splits in_proj and out_proj along K),
grid-wide barriers between the phases of a layer, each CTA's weight slices brought into shared memory by bulk
copies a phase or more ahead. For `SHAPE` only (d_model 1024, d_inner 2048, d_state 16, dt_rank 64, d_conv 4),
1..64 batch rows, bf16 or fp16 compute, no in_proj / out_proj biases, a GPU of compute capability 9.0+ with at
least 128 SMs (the cooperative launch refuses, with the driver's error, a GPU that cannot hold 64 pairs at once).

    pack_persistent(W: FusedWeights) -> PersistentWeights     (fused_step.pack_weights stacks W; once per model)
    persistent_step_fn(ids, W, conv_states, ssm_states, logits=None) -> logits (b, V) float32   (CUDA)
        the embedding and every layer in the kernel, then the final RMSNorm (step.add_rmsnorm_fn) and the head
        (cuBLAS); conv_states[l] (b, e, k-1) and ssm_states[l] (b, e, n) float32, updated in place
    reference: bytemamba.ops.fused_step.fused_step_ref (the same roundings; see the kernel's opening comment for
        the one difference of order, the norm's 1/rms applied after in_proj)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bytemamba.ops._cupy import (LAUNCH_CLUSTER_DIM, LAUNCH_COOPERATIVE, compile_module, cupy_stream, launch_ex,
                                 num_sms, ptr)
from bytemamba.ops.fused_step import FusedWeights, check_state, mma_fragments, state_table

SHAPE = dict(d_model=1024, d_inner=2048, d_state=16, dt_rank=64, d_conv=4)
NCTA = 128                      # CTAs (one per SM): d_inner / 16 channels
MAX_BATCH = 64                  # rows the kernel carries (fewer are masked)
MAX_LAYERS = 128                # the kernel keeps the state pointers in shared memory
C_EL = 1408                     # fp32 constants per (layer, CTA): see cuda/decode_persistent.cu
PCL = 2                         # CTAs a cluster: a pair splits in_proj and out_proj along K (the kernel's PCL)
_DTYPE_CODE = {torch.bfloat16: 1, torch.float16: 2}
WHO = "persistent step"         # how its error messages start


def unsupported_reason(*, d_model, d_inner, d_state, dt_rank, d_conv, dtype, batch, n_layer, biases=False,
                       device=None) -> str | None:
    """None where the persistent step applies, else one line saying why not."""
    got = dict(d_model=d_model, d_inner=d_inner, d_state=d_state, dt_rank=dt_rank, d_conv=d_conv)
    if got != SHAPE:
        diff = ", ".join(f"{k} {got[k]} (needs {v})" for k, v in SHAPE.items() if got[k] != v)
        return f"persistent step: compiled for one shape only: {diff}"
    if not 1 <= batch <= MAX_BATCH:
        return f"persistent step: batch {batch} (supports 1..{MAX_BATCH})"
    if not 1 <= n_layer <= MAX_LAYERS:
        return f"persistent step: {n_layer} layers (supports 1..{MAX_LAYERS})"
    if dtype not in _DTYPE_CODE:
        return f"persistent step: compute dtype {dtype} (needs bfloat16 or float16)"
    if biases:
        return "persistent step: in_proj / out_proj biases are not supported"
    if device is not None:
        if device.type != "cuda":
            return "persistent step: needs a CUDA device"
        if torch.cuda.get_device_capability(device) < (9, 0):
            return "persistent step: needs compute capability 9.0+ (bulk copies, mbarriers)"
        if num_sms(device) < NCTA:
            return f"persistent step: needs {NCTA} SMs for its resident CTAs, the device has {num_sms(device)}"
    return None


@dataclass
class PersistentWeights:
    """The weights sliced per CTA in mma fragment order. CTA c (pair p = c // 2, rank k = c % 2) owns channels
    16c..16c+15 and residual columns 8c..8c+7; it holds half of K (half k) of its pair's in_proj rows (those of CTAs
    2p and 2p+1) and of its pair's 16 out_proj rows."""
    Wi: torch.Tensor          # (L, 128, 32 * d) dtype: in_proj rows [x, z of 2p | x, z of 2p+1] x columns k d/2..
                              #   as 4 m-tiles of A fragments
    Wo: torch.Tensor          # (L, 128, 8 * e) dtype: out_proj rows 16p..16p+15 (2 n-tiles) x columns k e/2.., B
                              #   fragments (b_fragments)
    Wx: torch.Tensor          # (L, 128, (r + 2n) * 16) dtype: x_proj columns 16c.., A fragments
    C: torch.Tensor           # (L, 128, C_EL) float32: W_dt, A, conv_w, conv_b, dt_b, D, next norm weight
    norm0: torch.Tensor       # (d,) float32: layer 0's norm weight


def b_fragments(w: torch.Tensor) -> torch.Tensor:
    """(..., 8, K) -> (..., K/16 * 32 * 4): the B operand (K x 8, w transposed) of mma.m16n8k16 in fragment
    order, k-steps in order, 32 lanes x 4 elements (lane 4g + t: w[g, 2t], w[g, 2t+1], w[g, 2t+8], w[g, 2t+9])."""
    *lead, N, K = w.shape
    assert N == 8 and K % 16 == 0
    v = w.reshape(-1, 8, K // 16, 2, 4, 2)                         # (B, g, ks, hi, t, pair)
    return v.permute(0, 2, 1, 4, 3, 5).reshape(*lead, N * K)


def pack_persistent(W: FusedWeights) -> PersistentWeights:
    """W (fused_step.pack_weights) in the persistent kernel's layout (copies)."""
    L = W.n_layer
    e, d = W.W_in.shape[1] // 2, W.W_in.shape[2]
    ch, oc = e // NCTA, d // NCTA
    with torch.no_grad():
        def per_cta(t):                                          # (L, e, ...) -> (L, 128, 16 * ...)
            return t.reshape(L, NCTA, -1)
        rows = torch.cat([W.W_in[:, :e].reshape(L, NCTA, ch, d), W.W_in[:, e:].reshape(L, NCTA, ch, d)], dim=2)
        half = rows.reshape(L, NCTA // PCL, PCL * 2 * ch, PCL, d // PCL).transpose(2, 3)   # (L, p, k, 64, d/2)
        Wi = mma_fragments(half.reshape(L, NCTA, PCL * 2 * ch, d // PCL))
        wo = W.W_out.reshape(L, NCTA // PCL, PCL * oc, PCL, e // PCL).transpose(2, 3)       # (L, p, k, 16, e/2)
        Wo = b_fragments(wo.reshape(L, NCTA, PCL, oc, e // PCL)).reshape(L, NCTA, oc * e)
        Wx = mma_fragments(W.W_x.reshape(L, -1, NCTA, ch).transpose(1, 2))
        nxt = W.norm_w[1:L + 1].reshape(L, NCTA, oc)
        C = torch.cat([per_cta(W.W_dt), per_cta(W.A), per_cta(W.conv_w), per_cta(W.conv_b), per_cta(W.dt_b),
                       per_cta(W.D), nxt, torch.zeros(L, NCTA, 8, device=nxt.device)], dim=2).float()
        assert C.shape[2] == C_EL, C.shape
        return PersistentWeights(Wi=Wi.contiguous(), Wo=Wo.contiguous(), Wx=Wx.contiguous(), C=C.contiguous(),
                                 norm0=W.norm_w[0].contiguous())


# ---- CUDA launcher ------------------------------------------------------------------------------------------

def _defines() -> tuple:
    """Extra compile-time defines (variants; the kernel's opening defines say what each does), '+' or space
    separated, e.g. BYTEMAMBA_PERSISTENT_DEFINES="PROFILE=1" or "RED4=1+DBL1=1+DT4=1+SBULK=1"; read at every
    call, so tests, benches and the model's persistent path all take them (one compiled module per set)."""
    v = os.environ.get("BYTEMAMBA_PERSISTENT_DEFINES", "")
    return tuple(f"-D{x}" for x in v.replace("+", " ").split() if x)


def module(device, dtype):
    """The compiled kernel, its dynamic shared memory set (K["smem"])."""
    K = compile_module("decode_persistent.cu", (f"-DIN_DTYPE={_DTYPE_CODE[dtype]}",) + _defines(), device,
                       ("persistent_step", "persistent_smem", "persistent_prof"))
    if "smem" not in K:
        import cupy
        with cupy.cuda.Device(device.index):
            out = cupy.zeros(8, dtype=cupy.int32)
            K["persistent_smem"]((1,), (1,), (out,))
            smem, ncta, nthr, rows, cel, pcl = (int(v) for v in out.get()[:6])
        if (ncta, rows, cel, pcl) != (NCTA, MAX_BATCH, C_EL, PCL):
            raise RuntimeError(f"persistent step: the kernel reports {ncta} CTAs, {rows} rows, {cel} constants, "
                               f"clusters of {pcl}; the launcher expects {NCTA}, {MAX_BATCH}, {C_EL}, {PCL}")
        K["persistent_step"].max_dynamic_shared_size_bytes = smem
        K["smem"], K["threads"] = smem, nthr
    return K


@dataclass
class _Scratch:
    G: torch.Tensor
    Y: torch.Tensor
    xpart: torch.Tensor
    dbl: torch.Tensor
    sspart: torch.Tensor
    bars: torch.Tensor


_scratch: dict = {}


def _get_scratch(device, dtype) -> _Scratch:
    key = (device.index, dtype)
    s = _scratch.get(key)
    if s is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("persistent step: first call inside a graph capture (run one step eagerly first)")
        d, e, nx = SHAPE["d_model"], SHAPE["d_inner"], SHAPE["dt_rank"] + 2 * SHAPE["d_state"]
        z = dict(device=device)
        s = _Scratch(G=torch.zeros(MAX_BATCH * d, dtype=dtype, **z), Y=torch.zeros(MAX_BATCH * e, dtype=dtype, **z),
                     xpart=torch.zeros(NCTA * MAX_BATCH * nx, **z), dbl=torch.zeros(MAX_BATCH * nx, **z),
                     sspart=torch.zeros(NCTA * MAX_BATCH, **z), bars=torch.zeros(4, dtype=torch.int32, **z))
        _scratch[key] = s
    return s


def cooperative() -> bool:
    """Launch with CU_LAUNCH_ATTRIBUTE_COOPERATIVE (the driver checks that every CTA is resident; default), or
    plainly (BYTEMAMBA_PERSISTENT_COOP=0: one CTA per SM fits by its shared memory, nothing checks it)."""
    return os.environ.get("BYTEMAMBA_PERSISTENT_COOP", "1") not in ("0", "false", "False")


def _launch(device, fn, grid, block, args, smem, coop=True, cluster=1):
    if not coop and cluster == 1:
        import cupy
        with cupy.cuda.Device(device.index), cupy_stream(device):
            fn((grid,), (block,), args, shared_mem=smem)
        return
    attrs = ((LAUNCH_COOPERATIVE,) if coop else ()) + (((LAUNCH_CLUSTER_DIM, (cluster, 1, 1)),) if cluster > 1 else ())
    launch_ex(device, fn, grid, block, args, smem, attrs, "persistent step")


def persistent_layers_fn(ids, P: PersistentWeights, W: FusedWeights, conv_states, ssm_states, residual):
    """The kernel alone: residual (b, d) float32 <- the residual stream after every layer (states in place)."""
    dev = W.W_in.device
    b, L = ids.shape[0], W.n_layer
    e, n, k, d = SHAPE["d_inner"], SHAPE["d_state"], SHAPE["d_conv"], SHAPE["d_model"]
    why = unsupported_reason(d_model=W.W_in.shape[2], d_inner=W.W_in.shape[1] // 2, d_state=W.A.shape[2],
                             dt_rank=W.W_dt.shape[2], d_conv=W.conv_w.shape[2], dtype=W.dtype, batch=b, n_layer=L,
                             device=dev)
    if why:
        raise ValueError(why)
    if len(conv_states) != L or len(ssm_states) != L:
        raise ValueError(f"persistent step: {L} layers of weights, {len(conv_states)} / {len(ssm_states)} states")
    for i in range(L):
        check_state(f"conv state {i}", conv_states[i], (b, e, k - 1), WHO)
        check_state(f"ssm state {i}", ssm_states[i], (b, e, n), WHO)
    check_state("residual", residual, (b, d), WHO)
    ids = ids.to(torch.int64).contiguous()
    S = _get_scratch(dev, W.dtype)
    table = state_table(conv_states, ssm_states, dev, WHO)
    K = module(dev, W.dtype)
    _launch(dev, K["persistent_step"], NCTA, K["threads"],
            (ptr(ids), ptr(W.emb), ptr(P.norm0), np.float32(W.eps), ptr(P.Wi), ptr(P.Wo), ptr(P.Wx), ptr(P.C),
             ptr(table), np.int32(L), np.int32(b), ptr(residual), ptr(S.G), ptr(S.Y), ptr(S.xpart), ptr(S.dbl),
             ptr(S.sspart), ptr(S.bars)), K["smem"], coop=cooperative(), cluster=PCL)
    return residual


def persistent_step_fn(ids, W: FusedWeights, conv_states, ssm_states, P: PersistentWeights | None = None,
                       logits=None):
    """One decoding step: logits (b, V) float32. P: W in the kernel's layout (default: W.persistent, packed on
    the first call and kept there, as the rows kernel keeps W.rows)."""
    from bytemamba.ops.step import add_rmsnorm_fn
    if P is None:
        if W.persistent is None:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("persistent step: first call inside a graph capture (run one step eagerly first)")
            W.persistent = pack_persistent(W)
        P = W.persistent
    residual = torch.empty(ids.shape[0], SHAPE["d_model"], device=W.W_in.device, dtype=torch.float32)
    persistent_layers_fn(ids, P, W, conv_states, ssm_states, residual)
    h = add_rmsnorm_fn(residual, None, W.norm_w[W.n_layer], W.eps, W.dtype)
    out = F.linear(h, W.head).float()
    if logits is not None:
        logits.copy_(out)
        return logits
    return out


def profile(device, dtype) -> list:
    """The PROFILE=1 build's per-phase clock64 sums (thread 0 of CTA 0), read and zeroed: 32 slots (the kernel's
    PROFILE comment says which part of which phase each holds)."""
    import cupy
    K = module(device, dtype)
    with cupy.cuda.Device(device.index):
        out = cupy.zeros(32, dtype=cupy.int64)
        K["persistent_prof"]((1,), (32,), (out,))
        return [int(v) for v in out.get()]
