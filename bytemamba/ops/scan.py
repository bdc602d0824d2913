"""Selective scan (Mamba-1 S6): the definition, a fast pure-PyTorch path, and the dispatcher.

Semantics (DESIGN.md), for every backend:

    delta' = softplus(delta + delta_bias)        (bias and softplus optional)
    x_l    = exp(delta'_l * A) * x_{l-1} + delta'_l * B_l * u_l     state (batch, dim, n)
             (x_{l-1} is taken as 0 where reset[:, l] is set, and as initial_state before l=0)
    y_l    = sum_n C_l * x_l  +  D * u_l
    out_l  = y_l * silu(z_l)                      (gate optional)

Shapes: u, delta, z (batch, dim, length); A (dim, n); B, C (batch, n, length);
D, delta_bias (dim,); initial_state / final state (batch, dim, n) float32; reset (batch, length) bool.
Arithmetic is float32 (float64 when u is float64, for tests); out has u's dtype.

Backends:
    "ref"    selective_scan_ref: a Python loop over every position. The definition; slow.
    "torch"  selective_scan_chunked: the same recurrence as a two-level scan (about 2*sqrt(L) vectorised
             steps instead of L), differentiable by autograd. The path for machines without our kernels.
    "cuda"   our CUDA kernels (bytemamba.ops.scan_cuda), compiled at run time through CuPy.
    "auto"   "cuda" where a GPU and CuPy are present and the inputs are on the GPU, else "torch".
Asking for "cuda" where it cannot run raises; there is no silent fallback.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bytemamba.errors import UserError


class BackendError(UserError, RuntimeError):
    """A scan backend asked for where it cannot run."""


BACKENDS = ("auto", "ref", "torch", "cuda")


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Upcast to the compute dtype and apply the delta bias / softplus. Returns float tensors."""
    dt = _compute_dtype(u)
    u_, delta_ = u.to(dt), delta.to(dt)
    if delta_bias is not None:
        delta_ = delta_ + delta_bias.to(dt)[None, :, None]
    if delta_softplus:
        delta_ = F.softplus(delta_)
    return dt, u_, delta_, A.to(dt), B.to(dt), C.to(dt)


def _finish(y, u_, D, z, out_dtype):
    """Add the D skip and the SiLU(z) gate, cast to the output dtype."""
    if D is not None:
        y = y + u_ * D.to(y.dtype)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, reset):
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, length), got shape {tuple(u.shape)}")
    b, d, L = u.shape
    n = A.shape[-1]
    expect = {
        "delta": (delta, (b, d, L)),
        "A": (A, (d, n)),
        "B": (B, (b, n, L)),
        "C": (C, (b, n, L)),
        "D": (D, (d,)),
        "z": (z, (b, d, L)),
        "delta_bias": (delta_bias, (d,)),
        "initial_state": (initial_state, (b, d, n)),
        "reset": (reset, (b, L)),
    }
    for name, (t, shape) in expect.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}, got {tuple(t.shape)}")


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, return_final_state=False, reset=None):
    """The definition: one Python step per position. Slow; used by tests as ground truth."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, reset)
    dt, u_, delta_, A_, B_, C_ = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    b, d, L = u.shape
    x = u_.new_zeros(b, d, A.shape[-1]) if initial_state is None else initial_state.to(dt)
    ys = []
    for l in range(L):
        if reset is not None:
            x = x * (reset[:, l] == 0).to(dt)[:, None, None]      # a new document starts from zero
                                                                    # (any nonzero reset counts, as in CUDA)
        dA = torch.exp(delta_[:, :, l, None] * A_)                  # (b, d, n)
        dBu = (delta_[:, :, l] * u_[:, :, l])[:, :, None] * B_[:, None, :, l]
        x = dA * x + dBu
        ys.append(torch.einsum("bdn,bn->bd", x, C_[:, :, l]))
    y = torch.stack(ys, dim=-1)                                     # (b, d, L)
    out = _finish(y, u_, D, z, u.dtype)
    return (out, x.float()) if return_final_state else out


@torch.no_grad()
def _linear_recurrence_chunked(a, bx, x0, chunk):
    """x_t = a_t * x_{t-1} + bx_t along the FIRST axis, x_{-1} = x0. a, bx: (L, ...); x0: (...).

    Two levels, about 2*sqrt(L) vectorised Python steps instead of L:
      1. every chunk scanned at once from a zero start, keeping only its end value, and the product
         of its decays;
      2. the carries passed from chunk to chunk (L/chunk small steps);
      3. every chunk scanned again at once, now from its true incoming state, writing x.
    Exact for any a, zeros included (resets): no division or logarithm. Time is the leading axis so
    that every step reads contiguous slabs. No autograd: the callers write their own backward (the
    adjoint is the same recurrence run backwards).
    """
    L = a.shape[0]
    nc = -(-L // chunk)
    pad = nc * chunk - L
    if pad:
        a = torch.cat([a, a.new_ones((pad,) + a.shape[1:])])
        bx = torch.cat([bx, bx.new_zeros((pad,) + bx.shape[1:])])
    a = a.unflatten(0, (nc, chunk))                                 # (nc, T, ...)
    bx = bx.unflatten(0, (nc, chunk))
    end = bx[:, 0].clone()                                          # each chunk's end state from zero
    for t in range(1, chunk):
        end.mul_(a[:, t]).add_(bx[:, t])
    decay = a.prod(dim=1)                                           # (nc, ...)
    carry = torch.empty_like(end)                                   # state entering each chunk
    c = x0
    for j in range(nc):
        carry[j] = c
        c = torch.addcmul(end[j], decay[j], c)
    x = torch.empty_like(bx)
    prev = carry
    for t in range(chunk):
        torch.addcmul(bx[:, t], a[:, t], prev, out=x[:, t])
        prev = x[:, t]
    return x.flatten(0, 1)[:L], c


def _block_size(L: int, b: int, d: int, n: int) -> int:
    """Channels per block so that one block's (L, b, channels, n) tensors stay near the CPU caches."""
    return max(16, min(d, (1 << 20) // max(1, L * b * n)))


class _ChunkedScanCore(torch.autograd.Function):
    """The state recurrence and its readout, with a hand-written backward.

    Inputs are time-major, in the compute dtype, delta already biased / softplus'd:
        u, delta (L, b, d); A (d, n); B, C (L, b, n); x0 (b, d, n); keep (L, b) or None (0 at resets).
    Returns y (L, b, d) = sum_n C * x and the final state (b, d, n).

    The work goes block of channels by block of channels, so each block's (L, b, channels, n) tensors
    stay near the CPU caches (about 2x faster than whole-tensor passes on a 2-core machine), and nothing
    of that size is saved: backward recomputes a block's states, then runs the adjoint recurrence
    h_l = C_l gy_l + a_{l+1} h_{l+1} with the same chunked scan; every gradient is then a few products
    and reductions. (Autograd through the forward's Python steps would store and revisit every
    intermediate: 5-10x slower on a CPU.)
    """

    @staticmethod
    def _states(u, delta, A, B, x0, keep, chunk, s, e):
        """Decays a, states x and final state of channels [s, e)."""
        dl = delta[:, :, s:e]                                        # (L, b, c)
        a = torch.exp(dl[..., None] * A[s:e])                        # (L, b, c, n)
        if keep is not None:
            a.mul_(keep[:, :, None, None])
        bx = (dl * u[:, :, s:e])[..., None] * B[:, :, None, :]
        x, last = _linear_recurrence_chunked(a, bx, x0[:, s:e], chunk)
        return a, x, last

    @staticmethod
    def forward(ctx, u, delta, A, B, C, x0, keep, chunk):
        L, b, d = u.shape
        y = u.new_empty(L, b, d)
        last = torch.empty_like(x0)
        step = _block_size(L, b, d, A.shape[-1])
        for s in range(0, d, step):
            e = min(d, s + step)
            _, x, last[:, s:e] = _ChunkedScanCore._states(u, delta, A, B, x0, keep, chunk, s, e)
            y[:, :, s:e] = (x * C[:, :, None, :]).sum(-1)
        ctx.save_for_backward(u, delta, A, B, C, x0, keep)
        ctx.chunk = chunk
        return y, last

    @staticmethod
    def backward(ctx, gy, glast):
        u, delta, A, B, C, x0, keep = ctx.saved_tensors
        L, b, d = u.shape
        g_u, g_delta = torch.empty_like(u), torch.empty_like(delta)
        g_A, g_x0 = torch.empty_like(A), torch.empty_like(x0)
        g_B, g_C = torch.zeros_like(B), torch.zeros_like(C)
        step = _block_size(L, b, d, A.shape[-1])
        for s in range(0, d, step):
            e = min(d, s + step)
            a, x, _ = _ChunkedScanCore._states(u, delta, A, B, x0, keep, ctx.chunk, s, e)
            gyb = gy[:, :, s:e]                                      # (L, b, c)
            gx = gyb[..., None] * C[:, :, None, :]                   # dL/dx_l from y_l alone
            # adjoint, backwards in time: h_l = gx_l + a_{l+1} h_{l+1}, h_{L-1} = gx_{L-1} + glast
            a_next = torch.cat([torch.ones_like(a[:1]), a.flip(0)[:-1]])
            h0 = glast[:, s:e] if glast is not None else torch.zeros_like(x0[:, s:e])
            h, _ = _linear_recurrence_chunked(a_next, gx.flip(0), h0, ctx.chunk)
            h = h.flip(0)                                            # (L, b, c, n)
            g_x0[:, s:e] = a[0] * h[0]
            x_prev = torch.cat([x0[None, :, s:e], x[:-1]])           # x_{l-1}
            ga = h * x_prev * a                                      # dL/d(delta*A), elementwise
            dl, ub = delta[:, :, s:e], u[:, :, s:e]
            hB = (h * B[:, :, None, :]).sum(-1)
            g_delta[:, :, s:e] = (ga * A[s:e]).sum(-1) + hB * ub
            g_u[:, :, s:e] = hB * dl
            g_A[s:e] = (ga * dl[..., None]).sum((0, 1))
            g_B += (h * (dl * ub)[..., None]).sum(2)
            g_C += (x * gyb[..., None]).sum(2)
        return g_u, g_delta, g_A, g_B, g_C, g_x0, None, None


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           initial_state=None, return_final_state=False, reset=None, chunk=None):
    """Same function as selective_scan_ref, as a two-level parallel scan with a hand-written backward.

    Memory is O(batch * dim * n * length): fine for CPU training and tests, not meant for long GPU runs.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, reset)
    dt, u_, delta_, A_, B_, C_ = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    b, d, L = u.shape
    if chunk is None:
        chunk = max(1, int(math.isqrt(L)))
    x0 = u_.new_zeros(b, d, A.shape[-1]) if initial_state is None else initial_state.to(dt)
    keep = None if reset is None else (reset == 0).t().to(dt)        # (L, b); `~` would break int resets
    tm = lambda t: t.permute(2, 0, 1).contiguous()                   # (b, ., L) -> (L, b, .)
    y, last = _ChunkedScanCore.apply(tm(u_), tm(delta_), A_.contiguous(), tm(B_), tm(C_), x0, keep, chunk)
    out = _finish(y.permute(1, 2, 0), u_, D, z, u.dtype)
    return (out, last.float()) if return_final_state else out


def cuda_available() -> bool:
    """True where our CUDA kernels can run: a GPU for PyTorch and an importable CuPy."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """Turn "auto" into a concrete backend; refuse "cuda" where it cannot run (one clear message)."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown scan backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    dev = torch.device(device) if device is not None else None
    if backend == "auto":
        on_gpu = dev is not None and dev.type == "cuda"
        return "cuda" if on_gpu and cuda_available() else "torch"
    if backend == "cuda":
        if not torch.cuda.is_available():
            raise BackendError("scan backend 'cuda' was asked for, but PyTorch sees no CUDA GPU "
                               "(use backend 'torch' or 'auto')")
        if not cuda_available():
            raise BackendError("scan backend 'cuda' needs CuPy: pip install 'bytemamba[cuda]' "
                               "(cupy-cuda13x, or cupy-cuda12x for CUDA 12 drivers)")
        if dev is not None and dev.type != "cuda":
            raise BackendError(f"scan backend 'cuda' was asked for, but the inputs are on {dev}")
    return backend


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, reset=None, backend="auto"):
    """The selective scan through the chosen backend (see the module docstring)."""
    kind = resolve_backend(backend, u.device)
    if kind == "cuda" and backend == "auto" and (u.dtype == torch.float64 or A.shape[-1] > 64):
        kind = "torch"            # outside the CUDA kernel's envelope (float64, d_state > 64): auto picks torch
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state, reset)
    if kind == "cuda":
        from bytemamba.ops.scan_cuda import selective_scan_cuda
        return selective_scan_cuda(*args)
    if kind == "ref":
        return selective_scan_ref(*args)
    return selective_scan_chunked(*args)
