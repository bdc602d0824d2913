"""ByteMambaLM: the recurrent path reproduces the parallel one, streaming halves == whole, names, init."""

import math

import pytest
import torch

from bytemamba.config import ModelConfig
from bytemamba.models.lm import ByteMambaLM


def tiny(seed=0, **kw) -> ByteMambaLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, n_layer=2, d_state=4, scan_backend="torch", **kw)
    return ByteMambaLM(cfg).eval()


def ids(b, l, seed=1):
    return torch.randint(0, 256, (b, l), generator=torch.Generator().manual_seed(seed))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefill", [0, 1, 5, 11])
def test_step_by_step_reproduces_parallel_logits(prefill):
    m = tiny()
    x = ids(2, 12)
    with torch.no_grad():
        full = m(x)
        if prefill:
            last, cache = m.prefill(x[:, :prefill])
            close(last, full[:, prefill - 1])
            assert cache.seqlen_offset == prefill
        else:
            cache = m.empty_cache(2)
        steps = [m.step(x[:, i], cache) for i in range(prefill, 12)]
    close(torch.stack(steps, 1), full[:, prefill:])
    assert cache.seqlen_offset == 12


def test_forward_over_two_halves_with_state_equals_whole():
    m = tiny()
    x = ids(3, 20, seed=2)
    with torch.no_grad():
        whole = m(x)
        a, cache = m(x[:, :9], return_state=True)
        b, cache2 = m(x[:, 9:], state=cache, return_state=True)
    close(torch.cat([a, b], 1), whole)
    assert cache2.seqlen_offset == 20


def test_reset_in_lm_equals_separate_documents():
    m = tiny()
    x = ids(1, 14, seed=3)
    reset = torch.zeros(1, 14, dtype=torch.bool)
    reset[0, 6] = True
    with torch.no_grad():
        packed = m(x, reset)
        close(packed[:, :6], m(x[:, :6]))
        close(packed[:, 6:], m(x[:, 6:]))


def test_logits_shape_and_dtype():
    m = tiny()
    out = m(ids(2, 5))
    assert out.shape == (2, 5, 256) and out.dtype == torch.float32
    with pytest.raises(ValueError):
        m(ids(2, 5)[0])


def test_parameter_names_follow_public_mamba_layout():
    m = tiny()
    per_layer = ["norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias",
                 "mixer.x_proj.weight", "mixer.dt_proj.weight", "mixer.dt_proj.bias", "mixer.A_log",
                 "mixer.D", "mixer.out_proj.weight"]
    expect = {"backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight"}
    expect |= {f"backbone.layers.{i}.{p}" for i in range(2) for p in per_layer}
    assert set(m.state_dict()) == expect


def test_parameter_shapes():
    m = tiny()
    c = m.config
    e, n, r = c.d_inner, c.d_state, c.dt_rank_value
    sd = m.state_dict()
    assert r == math.ceil(16 / 16)
    assert sd["backbone.embedding.weight"].shape == (256, 16)
    assert sd["backbone.layers.0.mixer.in_proj.weight"].shape == (2 * e, 16)
    assert sd["backbone.layers.0.mixer.conv1d.weight"].shape == (e, 1, c.d_conv)
    assert sd["backbone.layers.0.mixer.x_proj.weight"].shape == (r + 2 * n, e)
    assert sd["backbone.layers.0.mixer.dt_proj.weight"].shape == (e, r)
    assert sd["backbone.layers.0.mixer.A_log"].shape == (e, n)
    assert sd["backbone.layers.0.mixer.out_proj.weight"].shape == (16, e)


def test_init_facts():
    m = tiny(dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4)
    c = m.config
    for layer in m.backbone.layers:
        mx = layer.mixer
        expect = torch.log(torch.arange(1, c.d_state + 1, dtype=torch.float32)).expand(c.d_inner, -1)
        torch.testing.assert_close(mx.A_log.detach(), expect)
        torch.testing.assert_close(mx.D.detach(), torch.ones(c.d_inner))
        dt = torch.nn.functional.softplus(mx.dt_proj.bias.detach().double())
        assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 0.1 * (1 + 1e-5)).all()
        assert dt.std() > 0                      # log-uniform draws, not a constant
    # the floor: with dt_min below it, every dt is at least the floor
    m2 = tiny(dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4)
    for layer in m2.backbone.layers:
        dt = torch.nn.functional.softplus(layer.mixer.dt_proj.bias.detach().double())
        torch.testing.assert_close(dt, torch.full_like(dt, 1e-4), rtol=1e-4, atol=0)


def test_tied_head_shares_storage_and_untied_does_not():
    m = tiny()
    assert m.lm_head.weight is m.backbone.embedding.weight
    assert m.lm_head.weight.data_ptr() == m.backbone.embedding.weight.data_ptr()
    n_unique = len({p.data_ptr() for p in m.parameters()})
    assert n_unique == len(list(m.parameters()))      # parameters() yields the tied one once
    u = tiny(tie_embeddings=False)
    assert u.lm_head.weight.data_ptr() != u.backbone.embedding.weight.data_ptr()
    assert u.num_parameters() == m.num_parameters() + 256 * 16


def test_training_step_reduces_loss_on_a_fixed_batch():
    m = tiny().train()
    x = ids(2, 24, seed=5)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
