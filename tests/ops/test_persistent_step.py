"""The persistent one-kernel decode step for byte353m-shaped models (bytemamba/ops/persistent_step.py,
cuda/decode_persistent.cu). CPU: the packed layouts and the kernel's activation layouts (its index formulas,
transcribed) against the mma fragment definitions of the PTX ISA; the shape limits; the kernel compiles for
sm_90 without spills. GPU: many steps against the PyTorch reference (fused_step_ref) and a float32 truth at
several batches, bf16 and fp16; bit determinism; the model's path against the parallel forward; graphs = no
graphs.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from bytemamba.ops.fused_step import fused_step_ref, pack_weights
from bytemamba.ops.persistent_step import (C_EL, MAX_BATCH, NCTA, SHAPE, b_fragments, pack_persistent,
                                           persistent_step_fn, unsupported_reason)
from bytemamba.ops.scan import cuda_available
from helpers.kernel_checks import assert_graphs_match, packed, perturbed_model, random_states, rel, teacher_forced

_needs_gpu = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU and CuPy")
_needs_big = pytest.mark.skipif(not (cuda_available() and torch.cuda.get_device_capability() >= (9, 0)
                                     and torch.cuda.get_device_properties(0).multi_processor_count >= NCTA),
                                reason=f"needs compute capability 9.0+ and {NCTA} SMs")
SRC = Path(__file__).resolve().parents[2] / "cuda" / "decode_persistent.cu"


def gpu(f):
    return pytest.mark.gpu(_needs_gpu(_needs_big(f)))


def make_model(n_layer=2, seed=0, device="cpu", backend="torch"):
    """byte353m's widths with few layers, weights perturbed away from their inits."""
    return perturbed_model(1024, n_layer, seed, device, backend)


# ---- CPU: layouts -----------------------------------------------------------------------------------------
# The mma.m16n8k16 fragments as the PTX ISA defines them (lane = 4 gid + tig):
#   A (16 x 16, row major), 8 elements a lane: (gid, 2tig..+1), (gid+8, 2tig..+1), (gid, 2tig+8..+9), (gid+8, 2tig+8..+9)
#   B (16 x 8, K x N), 4 elements a lane: (k 2tig..+1, n gid), (k 2tig+8..+9, n gid)

def _tile(frag, shape, where):
    """(32, E) lane elements -> the tile: element 2j + p of lane 4g + t goes to where(g, t, j, p)."""
    out = torch.empty(*shape, dtype=frag.dtype)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for e in range(frag.shape[1]):
            out[where(g, t, e >> 1, e & 1)] = frag[lane, e]
    return out


def a_tile(frag):
    """(32, 8) lane elements -> the 16 x 16 A tile."""
    return _tile(frag, (16, 16), lambda g, t, j, p: (g + 8 * (j & 1), 2 * t + p + 8 * (j >> 1)))


def b_tile(frag):
    """(32, 4) lane elements -> the 16 x 8 B tile (K x N)."""
    return _tile(frag, (16, 8), lambda g, t, j, p: (2 * t + p + 8 * j, g))


def test_packed_weights_are_the_mma_fragments_of_each_ctas_slice():
    """CTA c = 2p + k holds k-half k of the in_proj rows of CTAs 2p and 2p+1 (x, z of 2p, then x, z of 2p+1: 4
    m-tiles) and of out_proj rows 16p..16p+15 (2 n-tiles); x_proj's columns and the fp32 constants of its own 16
    channels; the next norm's weight of its 8 residual columns."""
    torch.manual_seed(0)
    L, e, d, r, n = 2, SHAPE["d_inner"], SHAPE["d_model"], SHAPE["dt_rank"], SHAPE["d_state"]
    layers = [dict(in_proj=torch.randn(2 * e, d), conv_w=torch.randn(e, 1, 4), conv_b=torch.randn(e),
                   x_proj=torch.randn(r + 2 * n, e), dt_w=torch.randn(e, r), dt_b=torch.randn(e),
                   A_log=torch.randn(e, n), D=torch.randn(e), out_proj=torch.randn(d, e)) for _ in range(L)]
    norms = [torch.randn(d) for _ in range(L + 1)]
    W = pack_weights(torch.randn(256, d), torch.randn(256, d), norms, layers, 1e-5, torch.float32)
    P = pack_persistent(W)
    assert P.Wi.shape == (L, NCTA, 32 * d) and P.Wo.shape == (L, NCTA, 8 * e) and P.C.shape == (L, NCTA, C_EL)
    for l, c in ((0, 0), (0, 1), (1, 77), (1, 126), (1, 127)):
        p, k = divmod(c, 2)
        wi = P.Wi[l, c].reshape(4, d // 32, 32, 8)                 # [m-tile][k-step][lane][8]
        for mt, ks in ((0, 0), (1, 3), (2, 31), (3, 17)):
            owner, part = 2 * p + mt // 2, mt % 2
            rows = part * e + owner * 16 + torch.arange(16)
            cols = slice(k * d // 2 + ks * 16, k * d // 2 + ks * 16 + 16)
            assert torch.equal(a_tile(wi[mt, ks]), layers[l]["in_proj"][rows][:, cols])
        wo = P.Wo[l, c].reshape(2, e // 32, 32, 4)                 # [n-tile][k-step][lane][4]
        for nt, ks in ((0, 0), (1, 5), (0, 63), (1, 63)):
            cols = slice(k * e // 2 + ks * 16, k * e // 2 + ks * 16 + 16)
            assert torch.equal(b_tile(wo[nt, ks]), layers[l]["out_proj"][16 * p + 8 * nt:16 * p + 8 * nt + 8, cols].t())
        wx = P.Wx[l, c].reshape(6, 32, 8)                           # [m-tile][lane][8]
        for mt in range(6):
            assert torch.equal(a_tile(wx[mt]), layers[l]["x_proj"][mt * 16:mt * 16 + 16, c * 16:c * 16 + 16])
        C = P.C[l, c]
        ch = slice(16 * c, 16 * c + 16)
        assert torch.equal(C[:1024].reshape(16, 64), layers[l]["dt_w"][ch])
        assert torch.equal(C[1024:1280].reshape(16, 16), -torch.exp(layers[l]["A_log"][ch]))
        assert torch.equal(C[1280:1344].reshape(16, 4), layers[l]["conv_w"][ch, 0])
        assert torch.equal(C[1344:1360], layers[l]["conv_b"][ch]) and torch.equal(C[1360:1376], layers[l]["dt_b"][ch])
        assert torch.equal(C[1376:1392], layers[l]["D"][ch])
        assert torch.equal(C[1392:1400], norms[l + 1][8 * c:8 * c + 8])
    assert torch.equal(P.norm0, norms[0])
    assert b_fragments(torch.arange(8 * 32.).reshape(8, 32)).shape == (256,)


def test_activation_layouts_of_the_kernel_are_mma_fragments():
    """The kernel's index formulas (transcribed from cuda/decode_persistent.cu): G written by the residual
    owners (emit) and read by in_proj's warps as B fragments; Y written by the channel owners and read by
    out_proj's warps as A fragments; both through 16 KB chunks of the ring (chunk i holds k-steps 8i..8i+7; below,
    w is the k-step within the chunk)."""
    BR, d, e = MAX_BATCH, SHAPE["d_model"], SHAPE["d_inner"]
    h = torch.randn(BR, d)
    G = torch.full((BR * d,), float("nan"))
    for c in range(NCTA):
        for tid in range(256):
            er, ep = tid >> 2, tid & 3
            idx = (((c >> 1) * (BR // 8) + (er >> 3)) * 32 + (er & 7) * 4 + ep) * 2 + (c & 1)
            G[2 * idx] = h[er, c * 8 + 2 * ep]
            G[2 * idx + 1] = h[er, c * 8 + 2 * ep + 1]
    assert not G.isnan().any()
    for i, w, nt in ((0, 0, 0), (3, 5, 7), (7, 7, 2)):
        chunk = G[i * 8192:(i + 1) * 8192].reshape(-1, 4)          # uint2 = 4 in_t
        frag = chunk[(w * (BR // 8) + nt) * 32 + torch.arange(32)]
        ks = i * 8 + w
        assert torch.equal(b_tile(frag), h[nt * 8:nt * 8 + 8, ks * 16:ks * 16 + 16].t())
    y = torch.randn(BR, e)
    Y = torch.full((BR * e,), float("nan"))
    for c in range(NCTA):
        for idx in range(512):
            mt, ln, j = idx >> 7, (idx >> 2) & 31, idx & 3
            row, k = mt * 16 + (ln >> 2) + (j & 1) * 8, 2 * (ln & 3) + (j >> 1) * 8
            u = (c * (BR // 16) * 32) * 4 + idx
            Y[2 * u], Y[2 * u + 1] = y[row, c * 16 + k], y[row, c * 16 + k + 1]
    assert not Y.isnan().any()
    for i, w, m in ((0, 0, 0), (9, 3, 2), (15, 7, 3)):
        chunk = Y[i * 8192:(i + 1) * 8192].reshape(-1, 8)          # uint4 = 8 in_t
        frag = chunk[(w * (BR // 16) + m) * 32 + torch.arange(32)]
        ks = i * 8 + w
        assert torch.equal(a_tile(frag), y[m * 16:m * 16 + 16, ks * 16:ks * 16 + 16])


def test_unsupported_shapes_and_batches_name_the_limit():
    ok = dict(d_model=1024, d_inner=2048, d_state=16, dt_rank=64, d_conv=4, dtype=torch.bfloat16, batch=64,
              n_layer=53)
    assert unsupported_reason(**ok) is None
    assert "batch 65 (supports 1..64)" in unsupported_reason(**{**ok, "batch": 65})
    assert "d_model 256 (needs 1024)" in unsupported_reason(**{**ok, "d_model": 256})
    assert "float32" in unsupported_reason(**{**ok, "dtype": torch.float32})
    assert "biases" in unsupported_reason(**ok, biases=True)
    assert "CUDA" in unsupported_reason(**ok, device=torch.device("cpu"))


def test_model_takes_the_persistent_path_only_where_asked(monkeypatch):
    m = make_model(n_layer=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lo, hi = m.persistent_batches
        assert "persistent_batches" in m.persistent_step_reason(lo - 1, torch.device("cpu"))
        assert "needs a CUDA device" in m.persistent_step_reason(hi, torch.device("cpu"))
        monkeypatch.setenv("BYTEMAMBA_PERSISTENT_STEP", "1")
        assert "needs a CUDA device" in m.persistent_step_reason(lo - 1, torch.device("cpu"))
        monkeypatch.setenv("BYTEMAMBA_PERSISTENT_STEP", "0")
        assert "turned off" in m.persistent_step_reason(64, torch.device("cpu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("dtype_code,defines", [(1, ()), (2, ()), (1, ("-DPROFILE=1",)), (2, ("-DPROFILE=1",))])
def test_kernel_compiles_for_sm90_without_spills(dtype_code, defines, tmp_path):
    r = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-cubin", "-o", str(tmp_path / "k.cubin"),
                        "-Xptxas", "-v", "-Werror", "all-warnings", f"-DIN_DTYPE={dtype_code}", *defines, str(SRC)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    stats = r.stderr.split("'persistent_step'")[-1]
    assert "0 bytes spill stores" in stats and "0 bytes stack frame" in stats, r.stderr


# ---- GPU --------------------------------------------------------------------------------------------------

# the build under test: BYTEMAMBA_PERSISTENT_DEFINES as pytest finds it (unset: the default build), e.g.
# BYTEMAMBA_PERSISTENT_DEFINES="PROFILE=1" python3 -m pytest -q -m gpu tests/ops/test_persistent_step.py
# (scripts/device_persistent.sh cand runs the file once per candidate); the model-path tests read the same variable
BUILDS = {"default": os.environ.get("BYTEMAMBA_PERSISTENT_DEFINES", "")}
CASES = [("default", torch.bfloat16, 64), ("default", torch.bfloat16, 37), ("default", torch.bfloat16, 1),
         ("default", torch.float16, 64)]


@gpu
@pytest.mark.parametrize("build,dtype,batch", CASES, ids=[f"{v}-{str(d)[6:]}-b{b}" for v, d, b in CASES])
def test_kernel_many_steps(build, dtype, batch, monkeypatch):
    """12 steps of the kernel against the reference (same roundings) and a float32 truth (the same rounded
    weights, no rounding of the activations): the kernel's error at most about twice the reference's."""
    monkeypatch.setenv("BYTEMAMBA_PERSISTENT_DEFINES", BUILDS[build])
    m = make_model(n_layer=3, seed=batch, device="cuda")
    W = packed(m, dtype)
    P = pack_persistent(W)
    W32 = packed(m, torch.float32, round_to=dtype)
    caches = [random_states(m, batch, "cuda", seed=7) for _ in range(3)]
    st = [([s.conv for s in c.layers], [s.ssm for s in c.layers]) for c in caches]
    ids = torch.randint(0, 256, (12, batch), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    out = {"k": [], "ref": [], "f32": []}
    with torch.no_grad():
        for t in range(ids.shape[0]):
            out["k"].append(persistent_step_fn(ids[t], W, *st[0], P=P).clone())
            out["ref"].append(fused_step_ref(ids[t], W, *st[1]))
            out["f32"].append(fused_step_ref(ids[t], W32, *st[2]))
    k, ref, f32 = (torch.stack(out[n]) for n in ("k", "ref", "f32"))
    assert torch.isfinite(k).all()
    assert rel(k, f32) <= 2 * rel(ref, f32) + 1e-4, (rel(k, f32), rel(ref, f32))
    assert rel(k, ref) < 3e-2, rel(k, ref)
    for i in range(3):
        for j in (0, 1):                                        # conv windows, SSM states
            err_k, err_r = rel(st[0][j][i], st[2][j][i]), rel(st[1][j][i], st[2][j][i])
            assert err_k <= 2 * err_r + 1e-4, (i, j, err_k, err_r)


@gpu
@pytest.mark.parametrize("build", list(BUILDS))
def test_kernel_is_deterministic_and_rows_independent(build, monkeypatch):
    """Same inputs, bit-identical outputs; a batch of 40 gives the same bits as its first 25 rows alone."""
    monkeypatch.setenv("BYTEMAMBA_PERSISTENT_DEFINES", BUILDS[build])
    m = make_model(n_layer=2, seed=5, device="cuda")
    W = packed(m, torch.bfloat16)
    P = pack_persistent(W)
    ids = torch.randint(0, 256, (40,), device="cuda", generator=torch.Generator("cuda").manual_seed(8))
    runs = []
    for rows in (range(40), range(40), range(25)):
        rows = list(rows)
        c = random_states(m, 40, "cuda", seed=9)
        conv = [s.conv[rows].contiguous() for s in c.layers]
        ssm = [s.ssm[rows].contiguous() for s in c.layers]
        for _ in range(3):
            logits = persistent_step_fn(ids[rows], W, conv, ssm, P=P).clone()
        runs.append((logits, torch.cat(ssm), torch.cat(conv)))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert torch.equal(runs[0][0][:25], runs[2][0])


@gpu
def test_kernel_refuses_65_rows():
    m = make_model(n_layer=1, seed=5, device="cuda")
    W = packed(m, torch.bfloat16)
    c = random_states(m, 65, "cuda")
    with pytest.raises(ValueError, match="batch 65"):
        persistent_step_fn(torch.zeros(65, dtype=torch.long, device="cuda"), W, [s.conv for s in c.layers],
                           [s.ssm for s in c.layers])


@gpu
@pytest.mark.parametrize("batch", [8, 64])
def test_model_takes_the_persistent_path_and_equals_the_forward(batch, monkeypatch):
    """Prefill + teacher-forced steps under bf16 autocast against the float32 parallel forward: the persistent
    step's error at most about twice the cuBLAS step's."""
    m = make_model(n_layer=3, seed=11, device="cuda", backend="cuda")
    g = torch.Generator("cuda").manual_seed(batch)
    prompt = torch.randint(0, 256, (batch, 33), device="cuda", generator=g)
    ids = torch.randint(0, 256, (batch, 16), device="cuda", generator=g)
    with torch.no_grad():
        want = m(torch.cat([prompt, ids], 1))[:, prompt.shape[1] - 1:-1].float()
    outs = {}
    for name, env in (("persistent", "1"), ("cublas", "0")):
        monkeypatch.setenv("BYTEMAMBA_PERSISTENT_STEP", env)
        outs[name] = teacher_forced(m, prompt, ids, lambda p: p == name)
    assert rel(outs["persistent"], want) <= 2 * rel(outs["cublas"], want) + 1e-3, \
        (rel(outs["persistent"], want), rel(outs["cublas"], want))


@gpu
def test_graphs_give_the_same_symbols_as_no_graphs(monkeypatch):
    monkeypatch.setenv("BYTEMAMBA_PERSISTENT_STEP", "1")
    m = make_model(n_layer=2, seed=3, device="cuda", backend="cuda")
    prompt = torch.randint(0, 256, (64, 17), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    assert_graphs_match(m, prompt, 20, "persistent")
