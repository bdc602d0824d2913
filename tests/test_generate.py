"""Sampling filters on hand-made distributions, greedy decoding, determinism, generation = the model."""

import math

import pytest
import torch

from bytemamba.config import ModelConfig
from bytemamba.errors import UserError
from bytemamba.generate import Sampling, filter_probs, generate, generate_text, sample_next
from bytemamba.models.lm import ByteMambaLM


def logits_of(probs):
    return torch.log(torch.tensor([probs], dtype=torch.float64)).float()


def kept(probs, **kw):
    out = filter_probs(logits_of(probs), Sampling(temperature=1.0, **kw))[0]
    return [i for i, p in enumerate(out.tolist()) if p > 0], out


def test_no_filter_is_softmax():
    p = [0.5, 0.25, 0.125, 0.125]
    _, out = kept(p)
    torch.testing.assert_close(out, torch.tensor(p), rtol=1e-6, atol=1e-6)


def test_temperature_scales_logits():
    lg = torch.tensor([[1.0, 2.0, 3.0]])
    out = filter_probs(lg, Sampling(temperature=0.5))
    torch.testing.assert_close(out, torch.softmax(lg / 0.5, -1))


def test_top_k():
    idx, out = kept([0.1, 0.4, 0.2, 0.3], top_k=2)
    assert idx == [1, 3]
    torch.testing.assert_close(out, torch.tensor([0, 0.4 / 0.7, 0, 0.3 / 0.7]), rtol=1e-5, atol=1e-6)
    assert kept([0.1, 0.4, 0.2, 0.3], top_k=1)[0] == [1]
    assert kept([0.1, 0.4, 0.2, 0.3], top_k=4)[0] == [0, 1, 2, 3]


def test_top_p_smallest_set_reaching_p():
    p = [0.05, 0.5, 0.15, 0.3]               # sorted: 0.5, 0.3, 0.15, 0.05
    assert kept(p, top_p=0.5)[0] == [1]      # 0.5 alone reaches 0.5
    assert kept(p, top_p=0.6)[0] == [1, 3]   # 0.5 + 0.3 = 0.8 >= 0.6
    assert kept(p, top_p=0.81)[0] == [1, 2, 3]
    assert kept(p, top_p=0.01)[0] == [1]     # the most likely symbol is always kept
    _, out = kept(p, top_p=0.6)
    torch.testing.assert_close(out, torch.tensor([0, 0.5 / 0.8, 0, 0.3 / 0.8]), rtol=1e-5, atol=1e-6)


def test_min_p_compares_probabilities_not_logits():
    # probabilities 0.6, 0.25, 0.1, 0.05; min_p = 0.3 keeps p >= 0.18: symbols 0 and 1.
    p = [0.6, 0.25, 0.1, 0.05]
    idx, out = kept(p, min_p=0.3)
    assert idx == [0, 1]
    torch.testing.assert_close(out, torch.tensor([0.6 / 0.85, 0.25 / 0.85, 0, 0]), rtol=1e-5, atol=1e-6)
    # Comparing logits instead (log p >= min_p * max log p; all logits negative) would keep a different
    # set: log(0.6) * 0.3 = -0.153, and only symbol 0 clears it. Make sure the two rules differ here.
    lg = [math.log(x) for x in p]
    by_logits = [i for i, v in enumerate(lg) if v >= 0.3 * max(lg)]
    assert by_logits != idx


def test_min_p_with_shifted_logits_is_unchanged():
    """Probabilities do not change when every logit shifts; a logit comparison would."""
    lg = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    s = Sampling(temperature=1.0, min_p=0.3)
    torch.testing.assert_close(filter_probs(lg, s), filter_probs(lg + 10.0, s))
    p = torch.softmax(lg, -1)[0]
    expect = [i for i in range(4) if p[i] >= 0.3 * p.max()]
    assert [i for i, v in enumerate(filter_probs(lg, s)[0].tolist()) if v > 0] == expect == [0, 1]


def test_filters_compose_per_row():
    lg = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    out = filter_probs(lg, Sampling(temperature=1.0, top_k=3, top_p=0.6))
    assert (out[0] > 0).tolist() == [True, True, False, False]
    assert (out[1] > 0).tolist() == [False, False, True, True]
    torch.testing.assert_close(out.sum(-1), torch.ones(2))


def test_temperature_zero_is_argmax():
    lg = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(lg, Sampling(temperature=0.0)), lg.argmax(-1))


def test_sampling_follows_the_filtered_distribution():
    lg = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    s = sample_next(lg, Sampling(temperature=1.0, top_k=2), g)
    counts = torch.bincount(s, minlength=4).float() / 4000
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0].item() - 0.625) < 0.03


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                dict(min_p=1.0), dict(min_p=-0.1)])
def test_bad_sampling_settings(kw):
    with pytest.raises(UserError):
        Sampling(**kw).check()


def tiny():
    torch.manual_seed(0)
    return ByteMambaLM(ModelConfig(d_model=16, n_layer=2, d_state=4, scan_backend="torch")).eval()


def test_sampling_from_a_generate_section():
    from bytemamba.config import GenerateConfig
    g = GenerateConfig(prompt="x", temperature=0.5, top_k=7, top_p=0.9, min_p=0.05, seed=3)
    assert Sampling.from_config(g) == Sampling(0.5, 7, 0.9, 0.05)
    # an exported config.json's dict: other keys ignored, missing ones keep Sampling's defaults
    assert Sampling.from_config({"temperature": 1.2, "prompt": "x", "max_bytes": 9}) == Sampling(temperature=1.2)


def test_same_seed_same_samples_different_seed_differs():
    m = tiny()
    prompt = torch.tensor([list(b"def ")] * 3)
    s = Sampling(temperature=1.0)
    a, la = generate(m, prompt, 20, s, seed=5)
    b, lb = generate(m, prompt, 20, s, seed=5)
    c, _ = generate(m, prompt, 20, s, seed=6)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.shape == (3, 20) and a.min() >= 0 and a.max() < 256


def test_greedy_generation_is_the_parallel_model_argmax():
    """Each greedy symbol is the argmax of the parallel forward over prompt + symbols so far, and the
    returned log-probability is the sum of the model's log-probabilities of those symbols."""
    m = tiny()
    prompt = torch.tensor([list(b"def ")])
    new, logp = generate(m, prompt, 8, Sampling(temperature=0.0))
    seq = torch.cat([prompt, new], 1)
    with torch.no_grad():
        lp = torch.log_softmax(m(seq[:, :-1]), -1)[0]
    p = prompt.shape[1]
    assert torch.equal(lp[p - 1:].argmax(-1), new[0])
    want = lp[p - 1:].gather(-1, new[0][:, None]).sum().double()
    torch.testing.assert_close(logp[0], want, rtol=1e-4, atol=1e-4)


def test_generate_text_and_empty_prompt():
    m = tiny()
    out = generate_text(m, "def ", 10, Sampling(temperature=0.0))
    assert len(out) == 1 and isinstance(out[0], str)
    out = generate_text(m, "", 5, Sampling(temperature=1.0), num_samples=2)
    assert len(out) == 2
    with pytest.raises(UserError):
        generate(m, torch.zeros(1, 0, dtype=torch.long), 3, Sampling())
