"""The tensor-core step GEMM (bytemamba/ops/gemm.py, cuda/decode_gemm.cu): every option against float64 on the
same rounded inputs (plain, bias, float32 out, the RMSNorm prologue, the conv epilogue with its state, the
residual epilogue with its partial sums), odd batches and widths, bf16 and fp16, every kind of launch plan;
the model's gemm path against its cuBLAS path. CPU tests of the argument checks and the launch plans."""

import os

import pytest
import torch

from bytemamba.ops.gemm import (MAX_BATCH, SMEM_MAX, batch_tiles, gemm_fn, gemm_supported, gemm_unsupported, plan,
                                smem_bytes)
from bytemamba.ops.scan import cuda_available
from bytemamba.ops.step import add_rmsnorm_ref, conv_state_update_ref

_needs_gpu = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU and CuPy")


def gpu(f):
    return pytest.mark.gpu(_needs_gpu(f))


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOL = 4e-3                      # one rounding of the output: <= 1/2 ulp (bf16: 2^-9), as gemv_step's tests


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check_all(dt, batch, N, K, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed + N + K + batch)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    W, bias, x = (r(N, K) * K ** -0.5).to(dt), r(N), r(batch, K).to(dt)
    want = x.double() @ W.double().T + bias.double()
    y = gemm_fn(W, x, bias=bias)
    assert y.dtype == dt and y.shape == (batch, N)
    assert rel(y, want) < TOL
    assert torch.equal(y, gemm_fn(W, x, bias=bias))                    # deterministic
    yf = gemm_fn(W, x, out_f32=True)
    assert yf.dtype == torch.float32 and rel(yf, want - bias.double()) < 1e-5
    # strided rows (the x half of in_proj's output)
    xz = r(batch, 2 * K).to(dt)
    assert rel(gemm_fn(W, xz[:, :K]), xz[:, :K].double() @ W.double().T) < TOL
    # norm in: partial sums of squares in several pieces per row
    res, nw = r(batch, K) * 2.0, r(K)
    partial = res.pow(2).reshape(batch, 4, K // 4).sum(-1)
    h = add_rmsnorm_ref(res.clone(), None, nw, 1e-5, dt)
    assert rel(gemm_fn(W, norm=(res, partial, nw, 1e-5)), h.double() @ W.double().T) < TOL
    # conv out (in_proj: N = 2e), the conv state updated
    if N % 2 == 0:
        e = N // 2
        cst, cw, cb = r(batch, e, 3), r(e, 4), r(e)
        cst_t = cst.clone()
        y = gemm_fn(W, x, conv=(cst, cw, cb))
        lin = (x.double() @ W.double().T).to(dt)
        assert rel(y[:, e:], lin[:, e:]) < TOL
        conv_t = conv_state_update_ref(lin[:, :e].float(), cst_t, cw, cb)
        assert rel(y[:, :e], conv_t) < 4 * TOL and rel(cst, cst_t) < TOL
    # residual add out, partial sums of squares
    res0 = r(batch, N)
    res1 = res0.clone()
    p = gemm_fn(W, x, bias=bias, resid=res1)
    want_res = res0.double() + want
    assert rel(res1, want_res) < TOL
    assert p.shape[0] == batch and abs(p.double().sum(1) / want_res.pow(2).sum(1) - 1).max().item() < 1e-5
    # and they feed the next norm prologue (a (128, N) projection: not under a forced plan made for K)
    if N % 32 == 0 and not os.environ.get("BYTEMAMBA_GEMM_TUNE"):
        nw2 = r(N)
        h2 = add_rmsnorm_ref(res1.clone(), None, nw2, 1e-5, dt)
        W2 = (r(128, N) * N ** -0.5).to(dt)
        assert rel(gemm_fn(W2, norm=(res1, p, nw2, 1e-5)), h2.double() @ W2.double().T) < TOL


@gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("batch", [2, 3, 20, 64, 65, 256])
@pytest.mark.parametrize("N,K", [(4096, 1024), (96, 2048), (1024, 2048), (200, 256), (48, 512)])
def test_gemm_kernel(dtype, batch, N, K):
    """The projections of byte353m / audio6m-sized models and an N that is no multiple of 16."""
    _check_all(DTYPES[dtype], batch, N, K)


@gpu
@pytest.mark.parametrize("tune", ["wm=1,wk=1,s=1", "wm=2,wk=4,s=1", "wm=4,wk=2,s=2", "wm=8,wk=1,s=8",
                                  "wm=3,wk=1,s=4", "wm=1,wk=1,s=1,epi=0", "wm=4,wk=2,s=2,epi=0",
                                  "wm=1,wk=2,s=8,epi=0"])
@pytest.mark.parametrize("batch", [5, 72])
def test_gemm_every_plan(tune, batch, monkeypatch):
    """Forced launch plans: no cluster, warps splitting K, several 256-k register passes (wm=1,wk=1,s=1: 4),
    clusters of 2..8, a row block that overhangs N; both cluster exchanges (epi 1 push, epi 0 pull)."""
    monkeypatch.setenv("BYTEMAMBA_GEMM_TUNE", tune)
    _check_all(torch.bfloat16, batch, 256, 1024, seed=1)


@gpu
@pytest.mark.parametrize("batch", [3, 20])
def test_model_gemm_step_equals_cublas_step(batch):
    """The LM's gemm path (bf16 autocast) against its cuBLAS path and the float32 truth, logits and states."""
    from bytemamba.config import ModelConfig
    from bytemamba.models.lm import ByteMambaLM
    torch.manual_seed(0)
    m = ByteMambaLM(ModelConfig(d_model=64, n_layer=3, d_state=8, scan_backend="cuda")).cuda().eval()
    prompt = torch.randint(0, 256, (batch, 21), device="cuda")
    ids = torch.randint(0, 256, (batch, 12), device="cuda")

    def run(gemm_max, autocast):
        m.gemm_max_batch = gemm_max
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            _, cache = m.prefill(prompt)
            out = torch.stack([m.step(ids[:, t], cache) for t in range(12)], 1)
        return out, m.last_step_path, cache

    truth, _, c_t = run(0, False)
    big, p_big, _ = run(0, True)
    small, p_small, c_s = run(256, True)
    assert (p_big, p_small) == ("cublas", "gemm")
    err = lambda a: ((a - truth).norm() / truth.norm()).item()  # noqa: E731
    assert torch.isfinite(small).all() and err(small) <= 2 * err(big) + 1e-3
    assert rel(c_s.layers[-1].ssm, c_t.layers[-1].ssm) < 2e-2


# ---- CPU: argument checks and plans ----------------------------------------------------------------------

def test_unsupported_reasons_are_one_line():
    assert gemm_unsupported(64, 1024, 2048, dtype=torch.bfloat16) is None
    assert gemm_supported(2, 256, dtype=torch.float16)
    for args, kw, word in [((64, 1024), dict(dtype=torch.float32), "float32 models keep"),
                           ((1, 1024), {}, "batch 1"), ((MAX_BATCH + 1, 1024), {}, f"batch {MAX_BATCH + 1}"),
                           ((8, 1000), {}, "width 1000")]:
        why = gemm_unsupported(*args, **kw)
        assert why and word in why and "\n" not in why


def test_gemm_fn_rejects_bad_input_before_any_launch():
    W = torch.zeros(64, 256, dtype=torch.float32)
    with pytest.raises(ValueError, match="float32 models keep"):
        gemm_fn(W, torch.zeros(4, 256))
    Wb = W.to(torch.bfloat16)
    with pytest.raises(ValueError, match="batch 1 outside"):
        gemm_fn(Wb, torch.zeros(1, 256, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="x has dtype"):
        gemm_fn(Wb, torch.zeros(4, 256, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"x must be \(4, 256\)"):
        gemm_fn(Wb, torch.zeros(4, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="width 48"):
        gemm_fn(torch.zeros(64, 48, dtype=torch.bfloat16), torch.zeros(4, 48, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="give x or norm"):
        gemm_fn(Wb)


@pytest.mark.parametrize("N,K,b,norm,resid", [(4096, 1024, 64, True, False), (96, 2048, 64, False, False),
                                              (1024, 2048, 64, False, True), (1024, 256, 256, True, False),
                                              (48, 512, 256, False, False), (256, 512, 3, False, True),
                                              (256, 1024, 65, True, False), (200, 32, 7, False, True)])
def test_plans_are_valid(N, K, b, norm, resid):
    p = plan(N, K, b, norm, resid)
    assert p["wm"] * p["wk"] <= 8 and p["s"] in (1, 2, 4, 8)
    assert K % (32 * p["s"] * p["wk"]) == 0 and p["wm"] <= -(-N // 16)
    assert smem_bytes(8 * p["nt"], K // p["s"], p["wm"], p["wk"], p["s"], resid) <= SMEM_MAX
    assert p["zb"] * 8 * p["nt"] >= b > (p["zb"] - 1) * 8 * p["nt"]


def test_plan_file(monkeypatch, tmp_path):
    f = tmp_path / "plans.json"
    f.write_text('{"1024,2048,64,0,1": "wm=2,wk=4,s=8"}')
    model_choice = plan(1024, 2048, 64, False, False)
    monkeypatch.setenv("BYTEMAMBA_GEMM_PLANS", str(f))
    assert {k: plan(1024, 2048, 64, False, True)[k] for k in ("wm", "wk", "s")} == dict(wm=2, wk=4, s=8)
    assert plan(1024, 2048, 64, False, False) == model_choice          # shapes not in the file: the cost model
    monkeypatch.setenv("BYTEMAMBA_GEMM_TUNE", "s=4")
    assert plan(1024, 2048, 64, False, True)["s"] == 4


def test_batch_tiles_balanced():
    assert batch_tiles(3) == (1, 1) and batch_tiles(20) == (1, 3) and batch_tiles(64) == (1, 8)
    assert batch_tiles(65) == (2, 5) and batch_tiles(256) == (4, 8) and batch_tiles(129) == (3, 6)


def test_tune_env(monkeypatch):
    monkeypatch.setenv("BYTEMAMBA_GEMM_TUNE", "wm=2,wk=2,s=4")
    assert {k: plan(1024, 2048, 64, False, False)[k] for k in ("wm", "wk", "s", "epi")} == dict(wm=2, wk=2, s=4, epi=1)
    monkeypatch.setenv("BYTEMAMBA_GEMM_TUNE", "epi=0")
    assert plan(1024, 2048, 64, False, False)["epi"] == 0
    monkeypatch.setenv("BYTEMAMBA_GEMM_TUNE", "wm=x")
    with pytest.raises(ValueError, match="BYTEMAMBA_GEMM_TUNE: bad item"):
        plan(1024, 2048, 64, False, False)
    monkeypatch.setenv("BYTEMAMBA_GEMM_TUNE", "s=16")
    with pytest.raises(ValueError, match="no launch plan"):
        plan(1024, 2048, 64, False, False)
