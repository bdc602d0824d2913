"""The fused one-kernel decode step (bytemamba/ops/fused_step.py; cuda/decode_fused.cu, the `cluster` kernel, and
cuda/decode_fused_rows.cu, the many-row `rows` kernel): its PyTorch reference is the model's step (CPU,
float32); many kernel steps against the reference and a float32 truth on random weights and random starting
states (never zeros), every compile-time variant, several batch sizes (one, several and partial row tiles);
the model takes the fused path where it applies and agrees with the parallel forward; graphs or not, the same
symbols.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from bytemamba.ops.fused_step import (ROWS_VARIANTS, SHAPE, choose_kernel, fused_step_fn, fused_step_ref,
                                      mma_fragments, rows_per_cluster, rows_variant,
                                      unsupported_reason)
from bytemamba.ops.scan import cuda_available
from helpers.kernel_checks import assert_graphs_match, packed, perturbed_model, random_states, rel, teacher_forced

_needs_gpu = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU and CuPy")
_needs_sm90 = pytest.mark.skipif(not (cuda_available() and torch.cuda.get_device_capability() >= (9, 0)),
                                 reason="needs thread-block clusters (compute capability 9.0+)")
SRC = Path(__file__).resolve().parents[2] / "cuda" / "decode_fused.cu"
SRC_ROWS = SRC.with_name("decode_fused_rows.cu")


def gpu(f):
    return pytest.mark.gpu(_needs_gpu(_needs_sm90(f)))


def make_model(n_layer=2, seed=0, device="cpu", backend="torch"):
    """The fused step's shape (d_model 256, d_state 16, ...), weights perturbed away from their inits."""
    return perturbed_model(256, n_layer, seed, device, backend)


# compile-time variants of the kernel (name: defines; see the opening of cuda/decode_fused.cu)
VARIANTS = {"default": "", "nodbl": "DBL_ONCE=0", "pack0": "PACK=0 DBL_ONCE=0", "pack2": "PACK=2 DBL_ONCE=0",
            "pack2dbl": "PACK=2", "cbar": "SYNC_MODE=0 DBL_ONCE=0", "cbar-pack0": "SYNC_MODE=0 PACK=0 DBL_ONCE=0"}
KERNEL_CASES = [("default", torch.bfloat16, 1), ("default", torch.bfloat16, 3), ("default", torch.float16, 1),
                ("default", torch.float16, 3)] + [(v, dt, b) for v in list(VARIANTS)[1:]
                                                  for dt, b in ((torch.bfloat16, 3), (torch.float16, 1))]
# the `rows` kernel (cuda/decode_fused_rows.cu): 16 rows a cluster; one partial tile, one full, several
KERNEL_CASES += [("rows", torch.bfloat16, 3), ("rows", torch.bfloat16, 16), ("rows", torch.bfloat16, 37),
                 ("rows", torch.float16, 20)]
# its 24-row build (ROWS_VARIANTS "r24"): one partial tile, one full, a full and a partial; fp16
BUILDS = ["r24"]
KERNEL_CASES += [("rows-r24", torch.bfloat16, 3), ("rows-r24", torch.bfloat16, 24), ("rows-r24", torch.bfloat16, 37),
                 ("rows-r24", torch.float16, 20)]


# ---- CPU --------------------------------------------------------------------------------------------------

def test_ref_in_float32_is_the_models_step():
    m = make_model()
    W = packed(m, torch.float32)
    c1, c2 = random_states(m, 3, "cpu"), random_states(m, 3, "cpu")
    ids = torch.randint(0, 256, (5, 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for t in range(5):
            want = m.step(ids[t], c1)
            got = fused_step_ref(ids[t], W, [s.conv for s in c2.layers], [s.ssm for s in c2.layers])
            assert rel(got, want) < 1e-5
    for a, b in zip(c1.layers, c2.layers):
        assert rel(b.conv, a.conv) < 1e-6 and rel(b.ssm, a.ssm) < 1e-5


def test_mma_fragments_layout():
    """Lane 4g + t of tile (m, k) holds A[g][2t..2t+1], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..] (PTX m16n8k16)."""
    w = torch.randn(2, 32, 48)
    f = mma_fragments(w).reshape(2, 2, 3, 32, 8)
    for mt, kt, lane in ((0, 0, 0), (1, 2, 13), (0, 1, 31), (1, 0, 6)):
        g, t = lane >> 2, lane & 3
        A = w[1, 16 * mt:16 * mt + 16, 16 * kt:16 * kt + 16]
        want = [A[g, 2 * t], A[g, 2 * t + 1], A[g + 8, 2 * t], A[g + 8, 2 * t + 1], A[g, 2 * t + 8],
                A[g, 2 * t + 9], A[g + 8, 2 * t + 8], A[g + 8, 2 * t + 9]]
        assert torch.equal(f[1, mt, kt, lane], torch.stack(want))


def test_kernel_choice(monkeypatch):
    assert choose_kernel(1) == "cluster"
    monkeypatch.setenv("BYTEMAMBA_FUSED_ROWS_FROM", "8")
    assert choose_kernel(8) == "cluster" and choose_kernel(9) == "rows"


def test_rows_variant_choice(monkeypatch):
    monkeypatch.delenv("BYTEMAMBA_FUSED_ROWS_VARIANT", raising=False)
    assert rows_variant() in ROWS_VARIANTS
    monkeypatch.setenv("BYTEMAMBA_FUSED_ROWS_VARIANT", "r24")
    assert rows_variant() == "r24"
    monkeypatch.setenv("BYTEMAMBA_FUSED_ROWS_VARIANT", "r17")
    with pytest.raises(ValueError, match="r17"):
        rows_variant()
    monkeypatch.delenv("BYTEMAMBA_FUSED_ROWS_VARIANT")
    # by waves on a device holding 15 clusters: r16 holds 240 rows a wave, r24 360 (one slower wave); at 721..960
    # rows r24's 3 waves cost more than r16's 4 (measured at 960 rows: 596.6 against 571.6 us, docs/PERF.md)
    assert [rows_variant(b, 15) for b in (1, 240, 241, 360, 361, 480, 481, 720, 721, 960)] == \
        ["r16", "r16", "r24", "r24", "r16", "r16", "r24", "r24", "r16", "r16"]
    assert rows_variant(256) == rows_variant(256, None) == "r16"          # cluster count unknown


def test_rows_per_cluster(monkeypatch):
    """The spread: a batch over every cluster of its waves, never more rows than the build's tile, every row
    covered in the same number of waves; BYTEMAMBA_FUSED_SPREAD=0: full tiles."""
    monkeypatch.delenv("BYTEMAMBA_FUSED_SPREAD", raising=False)                # (the default: spread)
    assert [rows_per_cluster(b, 24, 15) for b in (1, 64, 256, 360)] == [1, 5, 18, 24]
    assert [rows_per_cluster(b, 16, 15) for b in (64, 240, 241, 480)] == [5, 16, 9, 16]
    assert rows_per_cluster(256, 24, None) == 24                          # cluster count unknown: full tiles
    for rows in (16, 24):
        for b in range(1, 800, 7):
            rpc = rows_per_cluster(b, rows, 15)
            waves = -(-(-(-b // rows)) // 15)
            assert 1 <= rpc <= rows and -(-(-(-b // rpc)) // 15) == waves, (b, rows, rpc)
    monkeypatch.setenv("BYTEMAMBA_FUSED_SPREAD", "0")
    assert rows_per_cluster(64, 16, 15) == 16


def test_unsupported_reasons():
    ok = dict(SHAPE, dtype=torch.bfloat16)
    assert unsupported_reason(**ok) is None
    assert "d_model 128 (needs 256)" in unsupported_reason(**dict(ok, d_model=128))
    assert "float32" in unsupported_reason(**dict(ok, dtype=torch.float32))
    assert "biases" in unsupported_reason(**ok, biases=True)
    assert "CUDA" in unsupported_reason(**ok, device=torch.device("cpu"))
    m = make_model()
    assert m.fused_step_reason(1, torch.device("cpu")) is not None        # float32 on the CPU: not fused


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("defines", [["-DIN_DTYPE=2"]] + [["-DIN_DTYPE=1"] + [f"-D{d}" for d in v.split()]
                                                           for v in VARIANTS.values()])
def test_kernel_compiles_for_sm90_without_spills(defines, tmp_path):
    r = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-cubin", "-o", str(tmp_path / "k.cubin"),
                        "-Xptxas", "-v", "-Werror", "all-warnings", *defines, str(SRC)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "0 bytes spill stores" in r.stderr and "0 bytes stack frame" in r.stderr, r.stderr


ROWS_BUILDS = {**ROWS_VARIANTS, "r16-notrim": ("-DTRIM=0",), "r24-notrim": ("-DROWS=24", "-DTRIM=0"),  # (knobs)
               "r24-nobulk": ("-DROWS=24", "-DBULK=0", "-DTRIM=0")}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("build", list(ROWS_BUILDS))
@pytest.mark.parametrize("dtype_code", [1, 2])
def test_rows_kernel_compiles_for_sm90_without_spills(dtype_code, build, tmp_path):
    r = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-cubin", "-o", str(tmp_path / "k.cubin"),
                        "-Xptxas", "-v", "-Werror", "all-warnings", f"-DIN_DTYPE={dtype_code}",
                        *ROWS_BUILDS[build], str(SRC_ROWS)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    stats = r.stderr.split("fused_step_rows")[-1]
    assert "0 bytes spill stores" in stats and "0 bytes stack frame" in stats, r.stderr


# ---- GPU --------------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("variant,dtype,batch", KERNEL_CASES,
                         ids=[f"{v}-{str(dt)[6:]}-b{b}" for v, dt, b in KERNEL_CASES])
def test_kernel_many_steps(variant, dtype, batch, monkeypatch):
    """20 steps of the kernel against the reference (same roundings) and a float32 truth (no rounding of the
    activations, the same rounded weights): the kernel's error at most about twice the reference's."""
    kernel = "rows" if variant.startswith("rows") else "cluster"
    if kernel == "cluster":                  # (the rows kernel: BYTEMAMBA_FUSED_DEFINES as the caller set it)
        monkeypatch.setenv("BYTEMAMBA_FUSED_DEFINES", VARIANTS[variant])
    if variant.startswith("rows-"):          # ("rows": BYTEMAMBA_FUSED_ROWS_VARIANT as the caller set it)
        monkeypatch.setenv("BYTEMAMBA_FUSED_ROWS_VARIANT", variant[5:])
    m = make_model(n_layer=3, seed=batch, device="cuda")
    W = packed(m, dtype)
    W32 = packed(m, torch.float32, round_to=dtype)
    caches = [random_states(m, batch, "cuda", seed=7) for _ in range(3)]
    st = [([s.conv for s in c.layers], [s.ssm for s in c.layers]) for c in caches]
    ids = torch.randint(0, 256, (20, batch), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    out = {"k": [], "ref": [], "f32": []}
    with torch.no_grad():
        for t in range(20):
            logits = torch.full((batch, 256), float("nan"), device="cuda")      # poisoned: all written?
            out["k"].append(fused_step_fn(ids[t], W, *st[0], logits=logits, kernel=kernel).clone())
            out["ref"].append(fused_step_ref(ids[t], W, *st[1]))
            out["f32"].append(fused_step_ref(ids[t], W32, *st[2]))
    k, ref, f32 = (torch.stack(out[n]) for n in ("k", "ref", "f32"))
    assert torch.isfinite(k).all()
    assert rel(k, f32) <= 2 * rel(ref, f32) + 1e-4, (rel(k, f32), rel(ref, f32))
    assert rel(k, ref) < 3e-2
    for i in range(3):
        for j in (0, 1):                                        # conv windows, SSM states
            err_k, err_r = rel(st[0][j][i], st[2][j][i]), rel(st[1][j][i], st[2][j][i])
            assert err_k <= 2 * err_r + 1e-4, (i, j, err_k, err_r)


@gpu
def test_kernel_is_deterministic_and_rows_independent():
    """Same inputs, bit-identical outputs; a batch of 2 equals each row run alone."""
    m = make_model(n_layer=2, seed=5, device="cuda")
    W = packed(m, torch.bfloat16)
    ids = torch.tensor([17, 200], device="cuda")
    runs = []
    for rows in ([0, 1], [0, 1], [0], [1]):
        c = random_states(m, 2, "cuda", seed=9)
        conv = [s.conv[rows].contiguous() for s in c.layers]
        ssm = [s.ssm[rows].contiguous() for s in c.layers]
        runs.append((fused_step_fn(ids[rows], W, conv, ssm).clone(), torch.cat(ssm)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][0], torch.cat([runs[2][0], runs[3][0]]))


@gpu
@pytest.mark.parametrize("build", ["env"] + BUILDS)
def test_rows_kernel_is_deterministic_rows_independent_and_near_the_cluster_kernel(build, monkeypatch):
    """Same inputs, bit-identical outputs; rows split over tiles at other positions give the same bits; the
    cluster kernel (another summation order) agrees to rounding. build: "env" BYTEMAMBA_FUSED_ROWS_VARIANT as
    the caller set it, or a named build."""
    if build != "env":
        monkeypatch.setenv("BYTEMAMBA_FUSED_ROWS_VARIANT", build)
    m = make_model(n_layer=2, seed=6, device="cuda")
    W = packed(m, torch.bfloat16)
    ids = torch.randint(0, 256, (21,), device="cuda", generator=torch.Generator("cuda").manual_seed(8))
    runs = []
    for rows, kernel in ((range(21), "rows"), (range(21), "rows"), (range(5), "rows"), (range(5, 21), "rows"),
                         (range(21), "cluster")):
        rows = list(rows)
        c = random_states(m, 21, "cuda", seed=9)
        conv = [s.conv[rows].contiguous() for s in c.layers]
        ssm = [s.ssm[rows].contiguous() for s in c.layers]
        runs.append((fused_step_fn(ids[rows], W, conv, ssm, kernel=kernel).clone(), torch.cat(ssm), torch.cat(conv)))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert torch.equal(runs[0][0], torch.cat([runs[2][0], runs[3][0]]))
    assert rel(runs[0][0], runs[4][0]) < 1e-2 and rel(runs[0][1], runs[4][1]) < 1e-2
    assert rel(runs[0][2], runs[4][2]) < 1e-2


@gpu
@pytest.mark.parametrize("build", ["r16"] + BUILDS)
def test_rows_kernel_tiles_of_any_size_give_the_same_bits(build, monkeypatch):
    """Full tiles (BYTEMAMBA_FUSED_SPREAD=0: 42 rows as 16 + 16 + 10 or 24 + 18, partial mma n-tiles and rows
    that are not a multiple of 4) and the spread (tiles of 3) give bit-identical logits and states, near the
    reference: a tile's rows past its last never reach a real row (TRIM, the default, leaves them garbage)."""
    monkeypatch.setenv("BYTEMAMBA_FUSED_ROWS_VARIANT", build)
    m = make_model(n_layer=2, seed=11, device="cuda")
    W = packed(m, torch.bfloat16)
    ids = torch.randint(0, 256, (3, 42), device="cuda", generator=torch.Generator("cuda").manual_seed(12))
    runs = []
    for spread in ("0", "1", None):
        c = random_states(m, 42, "cuda", seed=13)
        conv, ssm = [s.conv for s in c.layers], [s.ssm for s in c.layers]
        out = []
        for t in range(3):
            if spread is None:
                out.append(fused_step_ref(ids[t], W, conv, ssm))
            else:
                monkeypatch.setenv("BYTEMAMBA_FUSED_SPREAD", spread)
                out.append(fused_step_fn(ids[t], W, conv, ssm, kernel="rows").clone())
        runs.append((torch.stack(out), torch.cat(ssm), torch.cat(conv)))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert torch.isfinite(runs[0][0]).all()
    assert all(rel(a, b) < 3e-2 for a, b in zip(runs[0], runs[2]))


@gpu
@pytest.mark.parametrize("batch,build", [(1, "env"), (2, "env"), (20, "env")] + [(20, b) for b in BUILDS])
def test_model_takes_the_fused_path_and_equals_the_forward(batch, build, monkeypatch):
    """Prefill + teacher-forced steps under bf16 autocast against the float32 parallel forward: the fused
    step's error at most about twice the small-batch GEMV / cuBLAS path's. build: the rows kernel's build
    (BYTEMAMBA_FUSED_ROWS_VARIANT as the caller set it, or named)."""
    monkeypatch.setenv("BYTEMAMBA_FUSED_ROWS_FROM", "8")
    if build != "env":
        monkeypatch.setenv("BYTEMAMBA_FUSED_ROWS_VARIANT", build)
    path = "fused-rows" if batch > 8 else "fused"
    m = make_model(n_layer=3, seed=11, device="cuda", backend="cuda")
    g = torch.Generator("cuda").manual_seed(batch)
    prompt = torch.randint(0, 256, (batch, 33), device="cuda", generator=g)
    ids = torch.randint(0, 256, (batch, 24), device="cuda", generator=g)
    with torch.no_grad():
        want = m(torch.cat([prompt, ids], 1))[:, prompt.shape[1] - 1:-1].float()
    outs = {}
    for name, fmax in (("fused", 1 << 20), ("unfused", 0)):
        m.fused_max_batch = fmax
        outs[name] = teacher_forced(m, prompt, ids, lambda p: (p == path) == bool(fmax))
    assert rel(outs["fused"], want) <= 2 * rel(outs["unfused"], want) + 1e-3


@gpu
def test_graphs_give_the_same_symbols_as_no_graphs():
    m = make_model(n_layer=2, seed=3, device="cuda", backend="cuda")
    prompt = torch.randint(0, 256, (2, 17), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    assert_graphs_match(m, prompt, 40, "fused")


@gpu
@pytest.mark.parametrize("build", ["env"] + BUILDS)
def test_rows_kernel_graphs_give_the_same_symbols_as_no_graphs(build, monkeypatch):
    monkeypatch.setenv("BYTEMAMBA_FUSED_ROWS_FROM", "0")
    if build != "env":
        monkeypatch.setenv("BYTEMAMBA_FUSED_ROWS_VARIANT", build)
    m = make_model(n_layer=2, seed=3, device="cuda", backend="cuda")
    m.fused_max_batch = 1 << 20
    prompt = torch.randint(0, 256, (18, 17), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    assert_graphs_match(m, prompt, 30, "fused-rows")
