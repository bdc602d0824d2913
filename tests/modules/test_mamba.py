"""MambaMixer: packed documents never leak (conv and scan), streaming from a state, the recurrent step."""

import pytest
import torch

from bytemamba.modules.mamba import Block, MambaMixer, MixerState, RMSNorm

D_MODEL = 8


def make_mixer(d_conv=4, seed=0, **kw):
    torch.manual_seed(seed)
    m = MambaMixer(D_MODEL, d_state=4, d_conv=d_conv, expand=2, scan_backend="torch", **kw)
    with torch.no_grad():            # non-trivial conv bias and D so every path is exercised
        if m.conv1d.bias is not None:
            m.conv1d.bias.normal_()
        m.D.normal_()
    return m.eval()


def hidden(b, l, seed=1):
    return torch.randn(b, l, D_MODEL, generator=torch.Generator().manual_seed(seed))


def close(a, b, atol=2e-5):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("d_conv", [1, 2, 4])
@pytest.mark.parametrize("starts", [[0, 5, 6, 13], [3], [1, 2, 3], [0]])
def test_resets_equal_running_each_document_alone(d_conv, starts):
    """A packed sequence with resets == each document run by itself from an empty state."""
    L = 17
    m = make_mixer(d_conv)
    h = hidden(2, L)
    reset = torch.zeros(2, L, dtype=torch.bool)
    reset[0, starts] = True                     # row 1 keeps no resets: one document
    with torch.no_grad():
        packed = m(h, reset)
        bounds = sorted(set([0] + starts + [L]))
        for s, e in zip(bounds[:-1], bounds[1:]):
            close(packed[0:1, s:e], m(h[0:1, s:e]))
        close(packed[1:2], m(h[1:2]))


@pytest.mark.parametrize("d_conv", [2, 4])
def test_resets_isolate_conv_and_scan(d_conv):
    """Changing a document changes nothing in the documents after it (the conv reaches back k-1)."""
    L, r = 16, 7
    m = make_mixer(d_conv)
    h = hidden(1, L)
    reset = torch.zeros(1, L, dtype=torch.bool)
    reset[0, r] = True
    h2 = h.clone()
    h2[:, :r] += torch.randn(1, r, D_MODEL)
    with torch.no_grad():
        a, b = m(h, reset), m(h2, reset)
    assert not torch.allclose(a[:, :r], b[:, :r])
    torch.testing.assert_close(a[:, r:], b[:, r:], rtol=0, atol=0)


@pytest.mark.parametrize("d_conv", [1, 2, 4])
@pytest.mark.parametrize("cut", [1, 2, 9])
def test_forward_from_state_equals_forward_on_concatenation(d_conv, cut):
    L = 12
    m = make_mixer(d_conv)
    h = hidden(2, L)
    with torch.no_grad():
        whole, s_whole = m(h, return_state=True)
        first, s1 = m(h[:, :cut], return_state=True)
        second, s2 = m(h[:, cut:], state=s1, return_state=True)
    close(torch.cat([first, second], 1), whole)
    close(s2.ssm, s_whole.ssm)
    close(s2.conv, s_whole.conv)


def test_state_across_calls_with_resets():
    """Three calls carrying the state, resets inside them (one right after a cut) == one call."""
    L = 20
    m = make_mixer(4)
    h = hidden(2, L, seed=3)
    reset = torch.zeros(2, L, dtype=torch.bool)
    reset[0, 8] = True          # first position of the second piece
    reset[1, 5] = True
    reset[1, 14] = True
    with torch.no_grad():
        whole = m(h, reset)
        outs, state = [], None
        for s, e in [(0, 8), (8, 15), (15, 20)]:
            o, state = m(h[:, s:e], reset[:, s:e], state=state, return_state=True)
            outs.append(o)
    close(torch.cat(outs, 1), whole)


@pytest.mark.parametrize("d_conv", [1, 4])
@pytest.mark.parametrize("prefill", [0, 1, 6])
def test_step_repeated_equals_forward(d_conv, prefill):
    L = 10
    m = make_mixer(d_conv)
    h = hidden(3, L, seed=4)
    with torch.no_grad():
        whole = m(h)
        if prefill:
            _, state = m(h[:, :prefill], return_state=True)
        else:
            state = m.empty_state(3, h.device)
        steps = [m.step(h[:, i], state) for i in range(prefill, L)]
    close(torch.stack(steps, 1), whole[:, prefill:])


def test_mixer_gradients_flow_through_every_parameter():
    m = make_mixer(4)
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[0, 4] = True
    m(hidden(2, 9), reset).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_rmsnorm_matches_formula():
    n = RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        n.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6)
    expect = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 7.0)
    close(n(x), expect, atol=1e-6)
    assert n(x.bfloat16()).dtype == torch.bfloat16


def test_block_is_prenorm_residual():
    m = make_mixer(4)
    blk = Block(D_MODEL, m).eval()
    r = hidden(1, 5)
    with torch.no_grad():
        close(blk(r), r + m(blk.norm(r)))


def test_state_make_contiguous_keeps_values_and_contiguous_tensors():
    conv, ssm = torch.randn(3, 2, 8).transpose(1, 2), torch.randn(3, 8, 4)        # a strided view, a plain one
    s = MixerState(conv=conv, ssm=ssm)
    s.make_contiguous()
    assert s.conv.is_contiguous() and torch.equal(s.conv, conv)
    assert s.ssm is ssm                                                            # already contiguous: kept
