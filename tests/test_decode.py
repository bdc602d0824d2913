"""Graph-captured decoding (bytemamba/decode.py): the same symbols with and without graphs for the same
seed; the fused CUDA step equals the PyTorch step; generate(graphs=False) is the plain prefill + step +
sample loop. GPU tests are marked and skipped without a GPU and CuPy."""

import copy

import pytest
import torch

from bytemamba.config import ModelConfig
from bytemamba.decode import GraphDecoder, decoder_for
from bytemamba.generate import Sampling, generate, sample_next
from bytemamba.models.lm import ByteMambaLM
from bytemamba.ops.scan import cuda_available

_needs_gpu = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU and CuPy")


def gpu(f):
    return pytest.mark.gpu(_needs_gpu(f))


SAMPLINGS = [Sampling(temperature=1.0), Sampling(temperature=0.8, top_k=20), Sampling(temperature=1.2, top_p=0.7),
             Sampling(temperature=1.0, min_p=0.05), Sampling(temperature=0.0),
             Sampling(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02)]


def model(backend="torch", d=32, n_layer=2, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return ByteMambaLM(ModelConfig(d_model=d, n_layer=n_layer, d_state=8, scan_backend=backend)).eval().to(device)


def plain_loop(m, prompt, n_new, s, seed):
    """The generation loop as it was before graphs: prefill, then sample / step."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        logits, cache = m.prefill(prompt)
        for i in range(n_new):
            sym = sample_next(logits, s, gen)
            out.append(sym)
            if i + 1 < n_new:
                logits = m.step(sym, cache)
    return torch.stack(out, 1)


@pytest.mark.parametrize("s", SAMPLINGS[:3])
def test_cpu_generate_is_the_plain_loop_with_or_without_graphs(s):
    m = model()
    prompt = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    want = plain_loop(m, prompt, 12, s, seed=4)
    a, la = generate(m, prompt, 12, s, seed=4, graphs=False)
    b, lb = generate(m, prompt, 12, s, seed=4, graphs=True)      # graphs are off on CPU
    assert torch.equal(a, want) and torch.equal(b, want) and torch.equal(la, lb)


def test_cpu_graph_decoder_eager_matches_generate():
    m = model()
    s = Sampling(temperature=1.0, top_k=30)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    want, want_lp = generate(m, prompt, 6, s, seed=9, graphs=False)
    dec = GraphDecoder(m, 2, s)
    gen = dec.seed(9)
    with torch.no_grad():
        logits, cache = m.prefill(prompt)
        sym = sample_next(logits, s, gen)
        lp = torch.log_softmax(logits, -1).gather(-1, sym[:, None])[:, 0].double()
        dec.load(cache, sym, lp)
        got = [sym.clone()]
        for _ in range(5):
            dec.step()
            got.append(dec.symbols.clone())
    assert dec.graph is None
    assert torch.equal(torch.stack(got, 1), want) and torch.allclose(dec.logp, want_lp)


# ---- GPU ----------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_lm_step_equals_torch_step(autocast):
    m = model("cuda", d=64, n_layer=3, device="cuda")
    m_t = copy.deepcopy(m)
    m_t.config.scan_backend = "torch"
    for layer in m_t.backbone.layers:
        layer.mixer.scan_backend = "torch"
    prompt = torch.randint(0, 256, (4, 33), device="cuda")
    ids = torch.randint(0, 256, (4, 24), device="cuda")
    ctx = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    with torch.no_grad():
        want = m_t(torch.cat([prompt, ids], 1))[:, prompt.shape[1] - 1:-1].float()     # float32 truth
    with torch.no_grad(), ctx:
        outs = {}
        for name, mm in (("cuda", m), ("torch", m_t)):
            logits, cache = mm.prefill(prompt)
            steps = [logits]
            for t in range(ids.shape[1] - 1):
                steps.append(mm.step(ids[:, t], cache))
            outs[name] = torch.stack(steps, 1)
    err = lambda a: ((a - want).norm() / want.norm()).item()  # noqa: E731
    if autocast:
        assert err(outs["cuda"]) <= 2 * err(outs["torch"]) + 1e-3
    else:
        assert err(outs["cuda"]) < 1e-4


@gpu
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("si", range(len(SAMPLINGS)))
def test_graphs_give_the_same_symbols_as_no_graphs(si, autocast):
    s = SAMPLINGS[si]
    m = model("auto", d=64, n_layer=3, seed=si, device="cuda")
    prompt = torch.randint(0, 256, (3, 17), device="cuda", generator=torch.Generator("cuda").manual_seed(si))
    a, la = generate(m, prompt, 40, s, seed=11, autocast=autocast, graphs=False)
    b, lb = generate(m, prompt, 40, s, seed=11, autocast=autocast, graphs=True)
    c, lc = generate(m, prompt, 40, s, seed=11, autocast=autocast, graphs=True)    # the cached graph again
    assert torch.equal(a, b) and torch.equal(b, c)
    assert torch.equal(la, lb) and torch.equal(lb, lc)
    if s.temperature > 0:
        d, _ = generate(m, prompt, 40, s, seed=12, autocast=autocast, graphs=True)
        assert not torch.equal(b, d)


@gpu
def test_decoders_cached_per_batch_size_and_rebuilt_when_weights_change():
    m = model("auto", d=32, n_layer=2, device="cuda")
    s = Sampling(temperature=1.0)
    d1, d2 = decoder_for(m, 2, s), decoder_for(m, 5, s)
    assert d1 is not d2 and d1 is decoder_for(m, 2, s) and d1.graph is not None
    prompt = torch.randint(0, 256, (2, 9), device="cuda")
    before, _ = generate(m, prompt, 10, s, seed=3)
    with torch.no_grad():
        m.lm_head.weight.mul_(3.0)                       # in place: the version counter moves
    assert decoder_for(m, 2, s) is not d1
    after, _ = generate(m, prompt, 10, s, seed=3)
    want, _ = generate(m, prompt, 10, s, seed=3, graphs=False)
    assert torch.equal(after, want) and not torch.equal(before, after)


@gpu
@pytest.mark.parametrize("batch", [1, 3, 8, 9])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("v2", ["0", "1"])
def test_small_batch_gemv_step_equals_cublas_step(batch, autocast, v2, monkeypatch):
    """Batches <= 8 run fused GEMVs (norm into in_proj, conv into its epilogue, residual into out_proj);
    the same steps through cuBLAS + add_rmsnorm give the same logits and states (batch 9: both cuBLAS)."""
    monkeypatch.setenv("BYTEMAMBA_STEP_V2", v2)        # v2: gemv_step with 8 loads in flight, ssm_step_rows
    m = model("cuda", d=64, n_layer=3, device="cuda")
    prompt = torch.randint(0, 256, (batch, 21), device="cuda")
    ids = torch.randint(0, 256, (batch, 12), device="cuda")
    ctx = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)

    def run(small, context):
        m.gemv_max_batch = 8 if small else 0
        with torch.no_grad(), context:
            _, cache = m.prefill(prompt)
            return torch.stack([m.step(ids[:, t], cache) for t in range(12)], 1)

    truth = run(False, torch.autocast("cuda", enabled=False))          # float32, cuBLAS path
    small, big = run(True, ctx), run(False, ctx)
    err = lambda a: ((a - truth).norm() / truth.norm()).item()  # noqa: E731
    assert small.shape == big.shape and torch.isfinite(small).all()
    if autocast:
        assert err(small) <= 2 * err(big) + 1e-3
    else:
        assert err(small) < 1e-5


def test_step_caches_and_decoders_are_left_behind_by_copies():
    """Weight casts and captured graphs hang off the model; deepcopy / pickling give a clean model."""
    import pickle

    from bytemamba.decode import _Decoders
    from bytemamba.ops.step import CastCache
    m = model()
    c = CastCache()
    c.get(m.lm_head.weight, torch.float16)
    m.__dict__["_step_casts"] = c
    m.__dict__["_graph_decoders"] = _Decoders(x=object())
    m2 = copy.deepcopy(m)
    m3 = pickle.loads(pickle.dumps(m))
    for mm in (m2, m3):
        assert mm._step_casts._d == {} and len(mm._graph_decoders) == 0
        assert torch.equal(mm.lm_head.weight, m.lm_head.weight)


@gpu
@pytest.mark.parametrize("si", range(len(SAMPLINGS)))
def test_fused_sampler_draws_from_filter_probs(si):
    """The v2 sampler (sample_rows): every draw is a symbol filter_probs keeps, the frequencies over 65536
    rows of the same logits match filter_probs' distribution, and logp gets log_softmax at the symbol."""
    from bytemamba.generate import filter_probs
    from bytemamba.ops.step import sample_fn
    s = SAMPLINGS[si]
    g = torch.Generator("cuda").manual_seed(si)
    base = torch.randn(1, 256, device="cuda", generator=g) * 2.0
    rows = 65536
    logits = base.expand(rows, 256).contiguous()
    sym = torch.empty(rows, dtype=torch.long, device="cuda")
    lp = torch.zeros(rows, dtype=torch.float64, device="cuda")
    seed = torch.tensor([1234 + si], device="cuda")
    counter = torch.tensor([7], device="cuda")
    sample_fn(logits, s.temperature, s.top_k, s.top_p, s.min_p, seed, counter, sym, lp)
    want_lp = torch.log_softmax(base[0].double(), -1)[sym]
    assert torch.allclose(lp, want_lp, atol=1e-4)
    if s.temperature == 0:
        assert (sym == base[0].argmax()).all()
        return
    probs = filter_probs(base, s)[0].double()
    assert (probs[sym] > 0).all()
    freq = torch.bincount(sym, minlength=256).double() / rows
    assert 0.5 * (freq - probs).abs().sum().item() < 0.05          # total variation
    sym2 = torch.empty_like(sym)
    counter += 1
    sample_fn(logits, s.temperature, s.top_k, s.top_p, s.min_p, seed, counter, sym2, lp)
    assert not torch.equal(sym, sym2)                                # the counter moves the stream


@gpu
@pytest.mark.parametrize("si", range(len(SAMPLINGS)))
def test_v2_graphs_give_the_same_symbols_as_no_graphs(si, monkeypatch):
    monkeypatch.setenv("BYTEMAMBA_STEP_V2", "1")
    s = SAMPLINGS[si]
    m = model("auto", d=64, n_layer=3, seed=si, device="cuda")
    prompt = torch.randint(0, 256, (5, 17), device="cuda", generator=torch.Generator("cuda").manual_seed(si))
    a, la = generate(m, prompt, 40, s, seed=11, autocast=True, graphs=False)
    b, lb = generate(m, prompt, 40, s, seed=11, autocast=True, graphs=True)
    c, lc = generate(m, prompt, 40, s, seed=11, autocast=True, graphs=True)
    assert torch.equal(a, b) and torch.equal(b, c)
    assert torch.equal(la, lb) and torch.equal(lb, lc)
    if s.temperature > 0:
        d, _ = generate(m, prompt, 40, s, seed=12, autocast=True, graphs=True)
        assert not torch.equal(b, d)
