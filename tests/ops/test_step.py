"""Decode-step ops (bytemamba/ops/step.py): many steps of the CUDA kernels against the parallel forward
(float64 truth) and the PyTorch step, every dtype; CPU tests of the references everywhere.

Every check draws fresh random inputs and random starting states (never zeros). In bf16/fp16 the kernel's
error against the float64 truth must be at most about twice the error of the PyTorch step (the reference)
on the same low-precision inputs.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from bytemamba.modules.mamba import MambaMixer, MixerState, RMSNorm
from bytemamba.ops.scan import cuda_available, selective_scan_ref
from bytemamba.ops.step import (add_rmsnorm_fn, add_rmsnorm_ref, conv_state_update_fn, conv_state_update_ref,
                                ssm_state_update_fn, ssm_state_update_ref)
from helpers.kernel_checks import rel

_needs_gpu = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU and CuPy")


def gpu(f):
    return pytest.mark.gpu(_needs_gpu(f))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- truths (float64, parallel) ------------------------------------------------------------------

def conv_parallel(xs, state0, w, bias, silu=True):
    """xs (b, e, L), state0 (b, e, k-1) -> outputs (b, e, L), final state: the parallel causal conv."""
    k = w.shape[-1]
    xp = torch.cat([state0, xs], dim=-1)
    y = F.conv1d(xp, w[:, None, :], bias, groups=w.shape[0])
    return (F.silu(y) if silu else y), xp[..., -(k - 1):]


def make_conv(b, e, k, L, dtype, dev, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(xs=r(b, e, L).to(dev, dtype), state=r(b, e, k - 1).to(dev, dtype).float(),
                w=(r(e, k) * 0.5).to(dev), bias=(r(e) * 0.3).to(dev) if bias else None)


def make_ssm(b, e, n, L, r_, dtype, dev, z=True, D=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ins = dict(x=r(b, e, L).to(dev, dtype), B=r(b, n, L).to(dev, dtype), C=r(b, n, L).to(dev, dtype),
               z=r(b, e, L).to(dev, dtype) if z else None, A=-torch.exp(r(e, n) * 0.5 + 0.5).float().to(dev),
               D=r(e).float().to(dev) if D else None, dt_bias=(r(e) * 0.3 - 1.0).float().to(dev),
               state=r(b, e, n).float().to(dev))
    if r_:
        ins["dt"] = (r(b, r_, L) * 0.5).to(dev, dtype)
        ins["W"] = (r(e, r_) * r_ ** -0.5).float().to(dev)
    else:
        ins["dt"] = (r(b, e, L) * 0.5 - 0.5).to(dev, dtype)
        ins["W"] = None
    return ins


def ssm_parallel(ins):
    """The parallel forward (selective_scan_ref) in float64: outputs (b, e, L), final state."""
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    dt = d64(ins["dt"])
    if ins["W"] is not None:
        dt = torch.einsum("brl,er->bel", dt, d64(ins["W"]))
    return selective_scan_ref(d64(ins["x"]), dt, d64(ins["A"]), d64(ins["B"]), d64(ins["C"]), d64(ins["D"]),
                              d64(ins["z"]), d64(ins["dt_bias"]), True, d64(ins["state"]), True)


def ssm_steps(fn, ins, L):
    state = ins["state"].clone()
    ys = []
    for t in range(L):
        col = lambda k: None if ins[k] is None else ins[k][..., t]  # noqa: E731
        ys.append(fn(state, col("x"), col("dt"), ins["A"], col("B"), col("C"), ins["D"], col("z"), ins["dt_bias"],
                     True, dt_proj_weight=ins["W"]))
    return torch.stack(ys, -1), state


def conv_steps(fn, ins, L, silu=True):
    state = ins["state"].clone()
    ys = [fn(ins["xs"][..., t], state, ins["w"], ins["bias"], silu) for t in range(L)]
    return torch.stack(ys, -1), state


# ---- CPU: the references are the step's math -----------------------------------------------------

@pytest.mark.parametrize("k", [2, 4])
def test_conv_ref_steps_equal_parallel_conv(k):
    ins = make_conv(2, 5, k, 9, torch.float64, "cpu")
    y, st = conv_steps(conv_state_update_ref, ins, 9)
    y64, st64 = conv_parallel(ins["xs"], ins["state"].double(), ins["w"], ins["bias"])
    assert rel(y, y64) < 1e-6 and rel(st, st64) < 1e-6        # the state is float32


@pytest.mark.parametrize("lowrank", [0, 3])
def test_ssm_ref_steps_equal_parallel_scan(lowrank):
    ins = make_ssm(2, 6, 5, 11, lowrank, torch.float32, "cpu")
    y, st = ssm_steps(ssm_state_update_ref, ins, 11)
    y64, st64 = ssm_parallel(ins)
    assert rel(y, y64) < 1e-5 and rel(st, st64) < 1e-5


def test_add_rmsnorm_ref_is_residual_add_then_rmsnorm():
    g = torch.Generator().manual_seed(3)
    norm = RMSNorm(12)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(12, generator=g))
    res, delta = torch.randn(3, 12, generator=g), torch.randn(3, 12, generator=g)
    want_res = res + delta
    res2 = res.clone()
    out = add_rmsnorm_ref(res2, delta, norm.weight, norm.eps, torch.float32)
    assert torch.equal(res2, want_res) and torch.allclose(out, norm(want_res), atol=1e-6)
    emb = torch.randn(256, 12, generator=g)
    ids = torch.tensor([3, 200, 7])
    out = add_rmsnorm_ref(res2, None, norm.weight, norm.eps, torch.float32, ids=ids, embedding=emb)
    assert torch.equal(res2, emb[ids]) and torch.allclose(out, norm(emb[ids]), atol=1e-6)


def test_mixer_torch_step_uses_the_refs_and_equals_forward():
    torch.manual_seed(0)
    m = MambaMixer(16, d_state=8, d_conv=4, scan_backend="torch")
    h = torch.randn(2, 13, 16)
    want = copy.deepcopy(m).double()(h.double())
    s = m.empty_state(2, "cpu")
    with torch.no_grad():
        got = torch.stack([m.step(h[:, t], s) for t in range(13)], 1)
    assert rel(got, want) < 1e-5


def test_launch_settings_from_the_environment(monkeypatch):
    """PDL by default at batch 1 only, forced on / off by BYTEMAMBA_STEP_PDL; BYTEMAMBA_STEP_TUNE
    overrides known launch shapes and refuses anything else with one clear line."""
    from bytemamba.ops.step import pdl, tuning
    monkeypatch.delenv("BYTEMAMBA_STEP_PDL", raising=False)
    assert pdl(1) and not pdl(2) and not pdl(8) and not pdl(64)
    monkeypatch.setenv("BYTEMAMBA_STEP_PDL", "1")
    assert pdl(256)
    monkeypatch.setenv("BYTEMAMBA_STEP_PDL", "0")
    assert not pdl(1)
    monkeypatch.setenv("BYTEMAMBA_STEP_TUNE", "ssm_rows=8, uk=2")
    t = tuning()
    assert t["ssm_rows"] == 8 and t["uk"] == 2 and t["rpw"] == 2
    for bad in ("ssm_rows=0", "rows=4", "uk=x"):
        monkeypatch.setenv("BYTEMAMBA_STEP_TUNE", bad)
        with pytest.raises(ValueError, match="BYTEMAMBA_STEP_TUNE"):
            tuning()


def test_ssm_rows_by_shape(monkeypatch):
    """ssm_step's rows per block by shape on a 132-SM GPU (the H200's measured choice: 1 row while that gives at
    most 4 blocks an SM, else 2), and the tuning override: honoured, or one clear line where it cannot run."""
    from bytemamba.ops import _cupy, step
    monkeypatch.delenv("BYTEMAMBA_STEP_TUNE", raising=False)
    monkeypatch.setitem(_cupy._sms, 0, 132)
    rows = lambda b, e, n=16, r=64: step.ssm_rows(b, e, n, r, torch.device("cuda", 0))  # noqa: E731
    assert [rows(b, 2048) for b in (1, 8, 16, 64, 256)] == [1, 1, 2, 2, 2]             # byte353m: 64 blocks a row
    assert [rows(b, 512, r=16) for b in (1, 8, 32, 64, 256)] == [1, 1, 1, 2, 2]        # audio6m: 16 blocks a row
    big = next(r for r in range(64, 8192, 64) if step._ssm_smem(2, 16, r)[1] > step._SSM_SMEM)
    assert step._ssm_smem(1, 16, big)[1] <= step._SSM_SMEM and rows(256, 2048, r=big) == 1   # only 1 row fits
    with pytest.raises(step.BackendError, match="dt_rank 16384 is too large"):
        rows(1, 2048, r=16384)
    monkeypatch.setenv("BYTEMAMBA_STEP_TUNE", "ssm_rows=4")
    assert rows(1, 2048) == 4
    for bad in ("ssm_rows=8", "ssm_rows=3"):
        monkeypatch.setenv("BYTEMAMBA_STEP_TUNE", bad)
        with pytest.raises(ValueError, match="BYTEMAMBA_STEP_TUNE: ssm_rows="):
            rows(64, 2048)


# ---- GPU: kernels against the parallel forward and the PyTorch step -----------------------------

def _check(err_k, err_t, dtype, what):
    if dtype == torch.float32:
        assert err_k < 2e-5, f"{what}: {err_k:.2e}"
    else:
        assert err_k <= 2 * err_t + 1e-4, f"{what}: kernel {err_k:.2e} vs PyTorch step {err_t:.2e}"


@gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("k,bias,silu", [(4, True, True), (2, False, True), (3, True, False)])
@pytest.mark.parametrize("seed", [0, 1])
def test_conv_kernel_many_steps(dtype, k, bias, silu, seed):
    dt = DTYPES[dtype]
    ins = make_conv(3, 133, k, 40, dt, "cuda", bias, seed)
    y_k, st_k = conv_steps(conv_state_update_fn, ins, 40, silu)
    y_t, st_t = conv_steps(conv_state_update_ref, ins, 40, silu)
    y64, st64 = conv_parallel(ins["xs"].double(), ins["state"].double(), ins["w"].double(),
                              None if ins["bias"] is None else ins["bias"].double(), silu)
    assert y_k.dtype == dt and torch.isfinite(y_k).all()
    _check(rel(y_k, y64), rel(y_t, y64), dt, "conv out")
    assert torch.equal(st_k, st_t)            # the window holds the inputs themselves: exact
    assert rel(st_k, st64) < 1e-7


def _check_ssm_kernel(ins, L, dt):
    """L steps of ssm_step against the parallel forward (float64) and the PyTorch step: outputs and states."""
    y_k, st_k = ssm_steps(ssm_state_update_fn, ins, L)
    y_t, st_t = ssm_steps(ssm_state_update_ref, ins, L)
    y64, st64 = ssm_parallel(ins)
    assert y_k.dtype == dt and torch.isfinite(y_k).all() and torch.isfinite(st_k).all()
    _check(rel(y_k, y64), rel(y_t, y64), dt, "ssm out")
    _check(rel(st_k, st64), rel(st_t, st64), dt, "ssm state")


@gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("n,lowrank,z,D", [(16, 0, True, True), (16, 8, True, True), (5, 3, False, True),
                                           (64, 0, True, False), (32, 16, False, False), (1, 0, True, True),
                                           (16, 80, True, True)])
@pytest.mark.parametrize("batch", [3, 9], ids=["b3", "b9"])
def test_ssm_kernel_many_steps(dtype, n, lowrank, z, D, batch):
    """ssm_step with the rows per block the launcher picks (e 70: a partial block of channels); rank 80 > 16 * 4
    reads the W_dt chunks past the registers from memory."""
    dt = DTYPES[dtype]
    L = 48
    ins = make_ssm(batch, 70, n, L, lowrank, dt, "cuda", z, D, seed=n + lowrank)
    _check_ssm_kernel(ins, L, dt)


@gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("n,lowrank", [(16, 64), (16, 16), (5, 3), (64, 0), (16, 80), (1, 0), (128, 8)])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_ssm_kernel_every_tile(dtype, n, lowrank, rows, monkeypatch):
    """Every ssm_step_r<rows> instance, forced through BYTEMAMBA_STEP_TUNE, on 19 rows (partial row tiles but for
    1 row a block) and 70 channels (a partial channel tile), against the parallel forward and the PyTorch step:
    the reduce-scatters of the dt dot and of <s, C> for rows below, at and above the lanes per channel."""
    monkeypatch.setenv("BYTEMAMBA_STEP_TUNE", f"ssm_rows={rows}")
    dt = DTYPES[dtype]
    L = 12
    ins = make_ssm(19, 70, n, L, lowrank, dt, "cuda", True, True, seed=rows + n + lowrank)
    _check_ssm_kernel(ins, L, dt)


@gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("batch", [1, 3, 8, 20])
@pytest.mark.parametrize("N,K", [(96, 2048), (1000, 256), (40, 64), (2 * 136, 1024)])
def test_gemv_kernel(dtype, batch, N, K):
    """gemv_step (the fused projections; batch 20: tiles of 8, 8 and 4 rows) against float64 on the same
    rounded inputs: plain, with RMSNorm in (against add_rmsnorm_ref's rounding), with the conv step out, with
    the residual add out (new residual and the per-block partial sums of squares)."""
    from bytemamba.ops.step import embed_rows_fn, gemv_fn, gemv_supported
    dt = DTYPES[dtype]
    if not gemv_supported(batch, K, dtype=dt):
        pytest.skip("outside the GEMV path's envelope (batch x width in shared memory)")
    tol = 2e-6 if dt == torch.float32 else 4e-3          # one rounding of the output: <= 1/2 ulp (bf16: 2^-9)
    g = torch.Generator(device="cuda").manual_seed(N + K + batch)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    W, bias, x = (r(N, K) * K ** -0.5).to(dt), r(N), r(batch, K).to(dt)
    want = x.double() @ W.double().T + bias.double()
    assert rel(gemv_fn(W, x, bias=bias), want) < tol
    assert rel(gemv_fn(W, x, out_f32=True), want - bias.double()) < tol
    # norm in: the partial sums as embed_rows leaves them
    emb, ids, nw = r(256, K), torch.randint(0, 256, (batch,), device="cuda", generator=g), r(K)
    res = torch.empty(batch, K, device="cuda")
    partial = embed_rows_fn(ids, emb, res)
    assert torch.equal(res, emb[ids])
    h = add_rmsnorm_ref(res.clone(), None, nw, 1e-5, dt)
    assert rel(gemv_fn(W, norm=(res, partial, nw, 1e-5)), h.double() @ W.double().T) < tol
    # conv out (in_proj: N = 2e)
    e = N // 2
    cst, cw, cb = r(batch, e, 3), r(e, 4), r(e)
    cst_t = cst.clone()
    y = gemv_fn(W, x, conv=(cst, cw, cb))
    lin = (x.double() @ W.double().T).to(dt)
    assert rel(y[:, e:], lin[:, e:]) < tol
    conv_t = conv_state_update_ref(lin[:, :e].float(), cst_t, cw, cb)
    assert rel(y[:, :e], conv_t) < 4 * tol and rel(cst, cst_t) < tol
    # residual add out, partial sums of squares per block
    res0 = r(batch, N)
    res1 = res0.clone()
    p = gemv_fn(W, x, bias=bias, resid=res1)
    want_res = res0.double() + want
    assert rel(res1, want_res) < tol
    assert abs(p.double().sum(1) / want_res.pow(2).sum(1) - 1).max().item() < 1e-5


@gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("d", [256, 1000, 2048])
def test_add_rmsnorm_kernel(dtype, d):
    dt = DTYPES[dtype]
    g = torch.Generator(device="cuda").manual_seed(d)
    res = torch.randn(5, d, device="cuda", generator=g)
    delta = torch.randn(5, d, device="cuda", generator=g).to(dt)
    w = torch.randn(d, device="cuda", generator=g)
    r_k, r_t = res.clone(), res.clone()
    o_k = add_rmsnorm_fn(r_k, delta, w, 1e-5, dt)
    o_t = add_rmsnorm_ref(r_t, delta, w, 1e-5, dt)
    r64 = res.double() + delta.double()
    o64 = r64 * torch.rsqrt(r64.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert torch.allclose(r_k, r_t, atol=1e-6)
    _check(rel(o_k, o64), rel(o_t, o64), dt, "rmsnorm")
    emb = torch.randn(256, d, device="cuda", generator=g)
    ids = torch.randint(0, 256, (5,), device="cuda", generator=g)
    o_k = add_rmsnorm_fn(r_k, None, w, 1e-5, dt, ids=ids, embedding=emb)
    assert torch.equal(r_k, emb[ids])
    _check(rel(o_k, add_rmsnorm_ref(r_t, None, w.double(), 1e-5, torch.float64, ids=ids, embedding=emb.double())),
           rel(add_rmsnorm_ref(r_t, None, w, 1e-5, dt, ids=ids, embedding=emb),
               add_rmsnorm_ref(r_t, None, w.double(), 1e-5, torch.float64, ids=ids, embedding=emb.double())),
           dt, "embed + rmsnorm")


@gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_mixer_cuda_step_equals_forward_and_torch_step(dtype):
    """MambaMixer.step on the cuda backend, many steps from a prefill state, against the parallel forward
    (float64) and the PyTorch step in the same precision (autocast for bf16/fp16, as generate runs)."""
    dt = DTYPES[dtype]
    torch.manual_seed(1)
    m = MambaMixer(64, d_state=16, d_conv=4, scan_backend="cuda").cuda()
    with torch.no_grad():
        m.D.normal_()
        m.conv1d.bias.normal_(std=0.3)
    m_t = copy.deepcopy(m)
    m_t.scan_backend = "torch"
    m64 = copy.deepcopy(m_t).double()
    h = torch.randn(3, 40, 64, device="cuda")
    pre, L = 24, 16
    want = m64(h.double())[:, pre:]
    _, s64 = m64(h[:, :pre].double(), return_state=True)
    ctx = (torch.autocast("cuda", dtype=dt) if dt != torch.float32 else torch.autocast("cuda", enabled=False))
    outs = {}
    with torch.no_grad(), ctx:
        for name, mod in (("cuda", m), ("torch", m_t)):
            s = MixerState(conv=s64.conv.float().clone(), ssm=s64.ssm.float().clone())
            outs[name] = torch.stack([mod.step(h[:, pre + t], s) for t in range(L)], 1)
    assert outs["cuda"].dtype == outs["torch"].dtype
    _check(rel(outs["cuda"], want), rel(outs["torch"], want), dt, "mixer step")

