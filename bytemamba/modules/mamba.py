"""The Mamba block, read top to bottom: RMSNorm, the mixer (S6 selective SSM), the pre-norm residual block.

Shapes: b = batch, l = length, d = d_model, e = d_inner (expand * d_model), n = d_state, k = d_conv,
r = dt_rank. Parameter names follow the public Mamba LM layout so released checkpoints load by name.

Packed sequences: `reset` (b, l) marks positions where a new document or clip begins. The scan zeroes
its state there and the causal conv does not reach back across it, so nothing leaks between documents.
Streaming: every forward can start from a `MixerState` (conv window + SSM state) and return the one it
ends in, which is how prefill, decoding and streaming evaluation carry context across calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bytemamba.ops.scan import resolve_backend, selective_scan
from bytemamba.ops.step import conv_state_update_ref, ssm_state_update_ref


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 whatever the input dtype; the residual stream is float32 anyway
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


@dataclass
class MixerState:
    """What one mixer carries from one call to the next (float32, batch-first)."""
    conv: torch.Tensor   # (b, e, k-1): the last k-1 conv inputs
    ssm: torch.Tensor    # (b, e, n): the SSM state

    def make_contiguous(self) -> None:
        """Replace strided views (prefill may hand them over) by contiguous copies: the step kernels update
        the states in place through raw pointers."""
        if not self.conv.is_contiguous():
            self.conv = self.conv.contiguous()
        if not self.ssm.is_contiguous():
            self.ssm = self.ssm.contiguous()


class MambaMixer(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 scan_backend: str = "auto"):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.scan_backend = scan_backend
        e, n, r = self.d_inner, d_state, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * e, bias=bias)           # -> x and the gate z
        self.conv1d = nn.Conv1d(e, e, d_conv, groups=e, bias=conv_bias, padding=d_conv - 1)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)             # -> dt (low rank), B, C
        self.dt_proj = nn.Linear(r, e, bias=True)                     # its bias is the scan's delta_bias
        self.out_proj = nn.Linear(e, d_model, bias=bias)

        # dt: weight ~ U(-r^-0.5, r^-0.5); bias = softplus^-1(dt0) with dt0 log-uniform in [dt_min, dt_max]
        with torch.no_grad():
            std = r ** -0.5
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # A = -exp(A_log) = -(1..n) for every channel (S4D-real); D = 1 (skip connection)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1))
        self.D = nn.Parameter(torch.ones(e))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    # ---- the parallel path: a whole sequence (training, prefill, streaming evaluation) ----------------
    def forward(self, hidden: torch.Tensor, reset: torch.Tensor | None = None,
                state: MixerState | None = None, return_state: bool = False):
        b, l, _ = hidden.shape
        xz = self.in_proj(hidden).transpose(1, 2)                      # (b, 2e, l)
        x, z = xz.chunk(2, dim=1)                                      # (b, e, l) each

        x_conv, conv_state = self._causal_conv(x, reset, state)        # (b, e, l)
        x = F.silu(x_conv)

        x_dbl = self.x_proj(x.transpose(1, 2))                         # (b, l, r + 2n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.to(dt.dtype).t()).transpose(1, 2)   # (b, e, l), bias in scan
        A = -torch.exp(self.A_log.float())                             # (e, n)
        res = selective_scan(
            x.contiguous(), delta.contiguous(), A,
            B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
            D=self.D.float(), z=z.contiguous(), delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True, initial_state=None if state is None else state.ssm,
            return_final_state=return_state, reset=reset, backend=self.scan_backend)
        y, ssm_state = res if return_state else (res, None)
        out = self.out_proj(y.transpose(1, 2))                          # (b, l, d)
        if return_state:
            return out, MixerState(conv=conv_state, ssm=ssm_state)
        return out

    def _causal_conv(self, x, reset, state):
        """Depthwise causal conv (kernel k) that starts from `state.conv` and never crosses a reset."""
        b, e, l = x.shape
        k = self.d_conv
        if reset is None and state is None:
            y = self.conv1d(x)[..., :l]
            # the state is the last k-1 inputs (zero-padded when l < k-1), not zeros: prefill and
            # streaming evaluation continue from it
            return y, F.pad(x, (k - 1, 0))[..., l:].float()
        left = (state.conv.to(x.dtype) if state is not None else x.new_zeros(b, e, k - 1))
        xp = torch.cat([left, x], dim=-1)                              # (b, e, l + k - 1)
        if reset is None:
            y = F.conv1d(xp, self.conv1d.weight, self.conv1d.bias, groups=e)
            new_conv = xp[..., l:].float()
            return y, new_conv
        # segment id of every padded position; the left context belongs to the segment before position 0
        seg = torch.cumsum(reset.to(torch.int32), dim=-1)              # (b, l)
        seg = F.pad(seg, (k - 1, 0), value=0)                          # (b, l + k - 1)
        w = self.conv1d.weight[:, 0, :].to(x.dtype)                    # (e, k); w[k-1] multiplies lag 0
        here = seg[:, k - 1:]                                          # segment of each output position
        y = torch.zeros_like(x)
        for j in range(k):                                             # tap j reads lag k-1-j
            same = (seg[:, j:j + l] == here).to(x.dtype)[:, None, :]   # (b, 1, l)
            y = y + w[None, :, j, None] * xp[..., j:j + l] * same
        if self.conv1d.bias is not None:
            y = y + self.conv1d.bias.to(x.dtype)[None, :, None]
        keep = (seg[:, l:] == seg[:, -1:]).to(x.dtype)[:, None, :]     # drop context from older documents
        new_conv = (xp[..., l:] * keep).float()
        return y, new_conv

    # ---- the recurrent path: one symbol (decoding) ----------------------------------------------------
    def empty_state(self, batch: int, device, dtype=torch.float32) -> MixerState:
        return MixerState(conv=torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
                          ssm=torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=dtype))

    def step(self, hidden: torch.Tensor, state: MixerState) -> torch.Tensor:
        """hidden (b, d) -> (b, d); updates `state` in place (so a captured CUDA graph can replay it).

        The backend follows `scan_backend`: 'cuda' (or 'auto' on a GPU with CuPy) runs the fused step kernels
        of bytemamba/ops/step.py, anything else the PyTorch references."""
        if self.step_backend(hidden.device) == "cuda":
            return self._step_cuda(hidden, state)
        xz = self.in_proj(hidden)                                      # (b, 2e)
        x, z = xz.chunk(2, dim=-1)
        x = conv_state_update_ref(x, state.conv, self.conv1d.weight, self.conv1d.bias, silu=True)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())                             # (e, n)
        y = ssm_state_update_ref(state.ssm, x, dt, A, B, C, self.D, z, self.dt_proj.bias, dt_softplus=True,
                                 dt_proj_weight=self.dt_proj.weight)
        return self.out_proj(y.to(self.out_proj.weight.dtype))

    def step_backend(self, device) -> str:
        """'cuda' (the step kernels) or a PyTorch backend. 'auto' picks PyTorch outside the kernels' envelope
        (float64, d_state > 128, a conv of one tap); 'cuda' there fails with a clear message."""
        kind = resolve_backend(self.scan_backend, device)
        if kind == "cuda" and self.scan_backend == "auto" and (
                self.step_dtype() not in (torch.float32, torch.bfloat16, torch.float16)
                or self.d_state > 128 or self.d_conv < 2):
            return "torch"
        return kind

    def step_dtype(self) -> torch.dtype:
        """The dtype the decode step computes its projections in: autocast's, else the weights'."""
        dev = self.in_proj.weight.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return self.in_proj.weight.dtype

    def step_small(self, residual, partial, norm_weight, eps, state: MixerState):
        """The fused GEMV step (CUDA; ByteMambaLM runs it for small batches): residual (b, d) float32
        += mixer(RMSNorm(residual)), in place, with the norm's mean square taken from `partial` (sums of
        squares per row, from the previous GEMV or the embedding). Four launches: in_proj (+norm,
        +conv/SiLU), x_proj, the state update (+dt_proj), out_proj (+residual add). Returns the new partial
        sums."""
        from bytemamba.ops.step import CastCache, gemv_fn, ssm_state_update_fn
        cache = self.__dict__.setdefault("_step_casts", CastCache())
        cdt, f32 = self.step_dtype(), torch.float32
        e, r, n = self.d_inner, self.dt_rank, self.d_state
        state.make_contiguous()
        xz = gemv_fn(cache.get(self.in_proj.weight, cdt), bias=cache.get(self.in_proj.bias, f32),
                     norm=(residual, partial, cache.get(norm_weight, f32), eps),
                     conv=(state.conv, cache.get(self.conv1d.weight, f32), cache.get(self.conv1d.bias, f32)))
        x = xz[:, :e]
        x_dbl = gemv_fn(cache.get(self.x_proj.weight, cdt), x)
        A = cache.get(self.A_log, f32, "A", lambda a: -torch.exp(a.float()))
        y = ssm_state_update_fn(state.ssm, x, x_dbl[:, :r], A, x_dbl[:, r:r + n], x_dbl[:, r + n:],
                                cache.get(self.D, f32), xz[:, e:], cache.get(self.dt_proj.bias, f32),
                                dt_softplus=True, dt_proj_weight=cache.get(self.dt_proj.weight, f32))
        return gemv_fn(cache.get(self.out_proj.weight, cdt), y, bias=cache.get(self.out_proj.bias, f32),
                       resid=residual)

    def _step_cuda(self, hidden: torch.Tensor, state: MixerState) -> torch.Tensor:
        from bytemamba.ops.step import CastCache, conv_state_update_fn, ssm_state_update_fn
        cache = self.__dict__.setdefault("_step_casts", CastCache())   # not a submodule, not in state_dict
        cdt, f32 = self.step_dtype(), torch.float32
        e, r, n = self.d_inner, self.dt_rank, self.d_state
        state.make_contiguous()
        xz = F.linear(hidden.to(cdt), cache.get(self.in_proj.weight, cdt), cache.get(self.in_proj.bias, cdt))
        x = conv_state_update_fn(xz[:, :e], state.conv, cache.get(self.conv1d.weight, f32),
                                 cache.get(self.conv1d.bias, f32), silu=True)
        x_dbl = F.linear(x, cache.get(self.x_proj.weight, cdt))       # (b, r + 2n)
        A = cache.get(self.A_log, f32, "A", lambda a: -torch.exp(a.float()))
        y = ssm_state_update_fn(state.ssm, x, x_dbl[:, :r], A, x_dbl[:, r:r + n], x_dbl[:, r + n:],
                                cache.get(self.D, f32), xz[:, e:], cache.get(self.dt_proj.bias, f32),
                                dt_softplus=True, dt_proj_weight=cache.get(self.dt_proj.weight, f32))
        return F.linear(y, cache.get(self.out_proj.weight, cdt), cache.get(self.out_proj.bias, cdt))


class Block(nn.Module):
    """Pre-norm residual block: residual += mixer(norm(residual)), the residual stream in float32."""

    def __init__(self, d_model: int, mixer: MambaMixer, eps: float = 1e-5):
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.mixer = mixer

    def forward(self, residual, reset=None, state=None, return_state=False):
        h = self.norm(residual)
        if return_state:
            out, new_state = self.mixer(h, reset, state, return_state=True)
            return residual + out.float(), new_state
        return residual + self.mixer(h, reset, state).float()

    def step(self, residual, state: MixerState):
        return residual + self.mixer.step(self.norm(residual), state).float()
