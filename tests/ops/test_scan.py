"""selective_scan_chunked (the PyTorch fast path) against selective_scan_ref (the definition), the
reference against an independent closed form, reset semantics, and the backend dispatcher."""

import math

import pytest
import torch

from bytemamba.errors import UserError
from bytemamba.ops.scan import (BackendError, resolve_backend, selective_scan, selective_scan_chunked,
                                selective_scan_ref)

F64 = torch.float64


def make_inputs(b, d, L, n, *, z=True, D=True, bias=True, init=False, reset=None, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    ins = dict(
        u=r(b, d, L),
        delta=r(b, d, L) * 0.5 - 0.5,
        A=-torch.exp(r(d, n) * 0.5),
        B=r(b, n, L),
        C=r(b, n, L),
        D=r(d) if D else None,
        z=r(b, d, L) if z else None,
        delta_bias=r(d) * 0.3 if bias else None,
        initial_state=r(b, d, n) if init else None,
        reset=reset,
    )
    return ins


GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def run_with_grads(fn, ins, softplus, seed=1, **kw):
    """Forward with final state, backward of a random projection of both outputs; returns values + grads."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if (k in GRAD_NAMES and v is not None) else v)
              for k, v in ins.items()}
    out, last = fn(**leaves, delta_softplus=softplus, return_final_state=True, **kw)
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    w_last = torch.randn(last.shape, generator=g, dtype=last.dtype)
    (out * w_out).sum().add((last * w_last).sum()).backward()
    grads = {k: leaves[k].grad for k in GRAD_NAMES if leaves.get(k) is not None}
    return out.detach(), last.detach(), grads


def assert_same(ins, softplus=True, chunk=None, rtol=1e-9, atol=1e-9):
    kw = {} if chunk is None else {"chunk": chunk}
    o1, s1, g1 = run_with_grads(selective_scan_ref, ins, softplus)
    o2, s2, g2 = run_with_grads(selective_scan_chunked, ins, softplus, **kw)
    torch.testing.assert_close(o2, o1, rtol=rtol, atol=atol)
    # final states are float32 by contract (DESIGN.md): compare at float32 precision
    torch.testing.assert_close(s2, s1, rtol=1e-6, atol=1e-6)
    assert g1.keys() == g2.keys()
    for k in g1:
        assert g1[k] is not None and g2[k] is not None, k
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-6, atol=1e-6, msg=lambda m: f"grad {k}: {m}")


# ---- the definition, pinned by an independent closed form -----------------------------------------

def test_reference_matches_hand_computed_scalar_recurrence():
    """n = 1, d = 1, b = 1: the recurrence written out by hand with plain floats."""
    L = 7
    ins = make_inputs(1, 1, L, 1, seed=3, init=True)
    reset = torch.zeros(1, L, dtype=torch.bool)
    reset[0, 4] = True
    out, last = selective_scan_ref(**{**ins, "reset": reset}, delta_softplus=True, return_final_state=True)
    u = ins["u"][0, 0].tolist()
    dl = ins["delta"][0, 0].tolist()
    a = ins["A"].item()
    Bv, Cv = ins["B"][0, 0].tolist(), ins["C"][0, 0].tolist()
    Dv, zv, bias = ins["D"].item(), ins["z"][0, 0].tolist(), ins["delta_bias"].item()
    x = ins["initial_state"].item()
    expect = []
    for l in range(L):
        dt = math.log1p(math.exp(dl[l] + bias))
        if l == 4:
            x = 0.0
        x = math.exp(dt * a) * x + dt * Bv[l] * u[l]
        y = Cv[l] * x + Dv * u[l]
        expect.append(y * zv[l] / (1 + math.exp(-zv[l])))
    torch.testing.assert_close(out[0, 0], torch.tensor(expect, dtype=F64), rtol=1e-12, atol=1e-12)
    assert abs(last.item() - x) < 1e-6


def test_reference_without_options_is_plain_ssm():
    """No D, z, bias, softplus: y_l = sum_n C_l x_l with x_l = exp(delta A) x_{l-1} + delta B u."""
    b, d, L, n = 2, 3, 5, 2
    ins = make_inputs(b, d, L, n, z=False, D=False, bias=False, seed=4)
    out = selective_scan_ref(**ins)
    x = torch.zeros(b, d, n, dtype=F64)
    for l in range(L):
        for i in range(b):
            for c in range(d):
                for s in range(n):
                    dl = ins["delta"][i, c, l]
                    x[i, c, s] = torch.exp(dl * ins["A"][c, s]) * x[i, c, s] + dl * ins["B"][i, s, l] * ins["u"][i, c, l]
        y = (x * ins["C"][:, None, :, l]).sum(-1)
        torch.testing.assert_close(out[:, :, l], y, rtol=1e-12, atol=1e-12)


# ---- fast path == definition: values and gradients of every input, float64 -------------------------

@pytest.mark.parametrize("L", [1, 2, 7, 17, 33])
def test_chunked_matches_ref_all_options(L):
    ins = make_inputs(2, 3, L, 4, init=True, seed=L)
    assert_same(ins)


@pytest.mark.parametrize("L,chunk", [(13, 4), (13, 5), (16, 16), (10, 1), (9, 32), (31, 8)])
def test_chunked_explicit_chunk(L, chunk):
    g = torch.Generator().manual_seed(L * 100 + chunk)
    reset = torch.rand(2, L, generator=g) < 0.2
    ins = make_inputs(2, 3, L, 3, init=True, reset=reset, seed=L + chunk)
    assert_same(ins, chunk=chunk)


@pytest.mark.parametrize("z,D,bias,softplus,init", [
    (False, False, False, False, False),
    (True, False, False, False, False),
    (False, True, False, True, False),
    (False, False, True, True, True),
    (True, True, True, False, True),
])
def test_chunked_option_combinations(z, D, bias, softplus, init):
    ins = make_inputs(2, 4, 11, 3, z=z, D=D, bias=bias, init=init, seed=7)
    if not softplus:   # keep delta positive without softplus, as a real model would
        ins["delta"] = ins["delta"].abs() + 0.05
    assert_same(ins, softplus=softplus)


@pytest.mark.parametrize("pattern", ["start", "consecutive", "end", "all", "random"])
def test_chunked_resets(pattern):
    b, L = 2, 12
    reset = torch.zeros(b, L, dtype=torch.bool)
    if pattern == "start":
        reset[:, 0] = True
    elif pattern == "consecutive":
        reset[0, 3:6] = True
        reset[1, 0:2] = True
    elif pattern == "end":
        reset[:, L - 1] = True
    elif pattern == "all":
        reset[:] = True
    else:
        reset = torch.rand(b, L, generator=torch.Generator().manual_seed(0)) < 0.3
    ins = make_inputs(b, 3, L, 4, init=True, reset=reset, seed=11)
    assert_same(ins, chunk=5)
    assert_same(ins)


def test_reset_at_zero_discards_initial_state():
    ins = make_inputs(2, 3, 6, 4, init=True, seed=5)
    reset = torch.zeros(2, 6, dtype=torch.bool)
    reset[:, 0] = True
    for fn in (selective_scan_ref, selective_scan_chunked):
        with_init = fn(**{**ins, "reset": reset}, delta_softplus=True)
        without = fn(**{**ins, "reset": None, "initial_state": None}, delta_softplus=True)
        torch.testing.assert_close(with_init, without, rtol=0, atol=0)
    # and the initial state then gets no gradient
    _, _, g = run_with_grads(selective_scan_chunked, {**ins, "reset": reset}, True)
    assert torch.count_nonzero(g["initial_state"]) == 0


@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_chunked])
def test_reset_isolates_what_comes_after(fn):
    """Perturbing anything before a reset must not change any output at or after it."""
    b, d, L, n, r = 2, 3, 15, 4, 6
    reset = torch.zeros(b, L, dtype=torch.bool)
    reset[:, r] = True
    ins = make_inputs(b, d, L, n, init=True, reset=reset, seed=9)
    base, last = fn(**ins, delta_softplus=True, return_final_state=True)
    pert = dict(ins)
    g = torch.Generator().manual_seed(99)
    for k in ("u", "delta", "z"):
        t = ins[k].clone()
        t[..., :r] += torch.randn(t[..., :r].shape, generator=g, dtype=F64)
        pert[k] = t
    for k in ("B", "C"):
        t = ins[k].clone()
        t[..., :r] += torch.randn(t[..., :r].shape, generator=g, dtype=F64)
        pert[k] = t
    pert["initial_state"] = ins["initial_state"] + 1.0
    out, last2 = fn(**pert, delta_softplus=True, return_final_state=True)
    assert not torch.allclose(out[..., :r], base[..., :r])          # the perturbation did something
    torch.testing.assert_close(out[..., r:], base[..., r:], rtol=0, atol=1e-12)
    torch.testing.assert_close(last2, last, rtol=0, atol=1e-6)
    # and equals scanning the tail alone from an empty state
    tail = {k: (v[..., r:] if k in ("u", "delta", "z", "B", "C") else v) for k, v in ins.items()}
    tail["reset"], tail["initial_state"] = None, None
    torch.testing.assert_close(fn(**tail, delta_softplus=True), base[..., r:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_chunked])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32])
def test_non_bool_reset_means_nonzero(fn, dtype):
    """0/1 resets of another dtype act like the bool ones (as the CUDA path's reset.to(bool) does)."""
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[0, 3] = reset[1, 0] = reset[1, 7] = True
    ins = make_inputs(2, 3, 9, 2, init=True, reset=reset, seed=21)
    expect = fn(**ins, delta_softplus=True)
    got = fn(**{**ins, "reset": reset.to(dtype)}, delta_softplus=True)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_reset_only_affects_its_own_batch_row():
    b, L = 2, 10
    reset = torch.zeros(b, L, dtype=torch.bool)
    reset[0, 4] = True
    ins = make_inputs(b, 3, L, 2, init=True, reset=reset, seed=12)
    out = selective_scan_chunked(**ins, delta_softplus=True)
    no_reset = selective_scan_chunked(**{**ins, "reset": None}, delta_softplus=True)
    torch.testing.assert_close(out[1], no_reset[1], rtol=0, atol=1e-12)
    assert not torch.allclose(out[0, :, 4:], no_reset[0, :, 4:])


def test_initial_state_continues_a_split_sequence():
    """Scanning the first part, then the rest from its final state == scanning the whole."""
    ins = make_inputs(2, 3, 14, 4, seed=13)
    whole, last = selective_scan_chunked(**ins, delta_softplus=True, return_final_state=True)
    cut = 6
    head = {k: (v[..., :cut] if k in ("u", "delta", "z", "B", "C") else v) for k, v in ins.items()}
    tail = {k: (v[..., cut:] if k in ("u", "delta", "z", "B", "C") else v) for k, v in ins.items()}
    o1, s1 = selective_scan_chunked(**head, delta_softplus=True, return_final_state=True)
    o2, s2 = selective_scan_chunked(**{**tail, "initial_state": s1.double()}, delta_softplus=True,
                                    return_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], -1), whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s2, last, rtol=1e-6, atol=1e-6)


def test_float32_close_to_float64():
    ins64 = make_inputs(2, 4, 40, 8, init=True, seed=14)
    ins32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in ins64.items()}
    ref = selective_scan_ref(**ins64, delta_softplus=True)
    out = selective_scan_chunked(**ins32, delta_softplus=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_bfloat16_inputs_give_bfloat16_output():
    ins = make_inputs(1, 2, 9, 2, seed=15, dtype=torch.float32)
    ins = {k: (v.bfloat16() if k in ("u", "delta", "z", "B", "C") and v is not None else v)
           for k, v in ins.items()}
    out, last = selective_scan_chunked(**ins, delta_softplus=True, return_final_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    ref = selective_scan_ref(**ins, delta_softplus=True)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


# ---- the dispatcher --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "ref", "auto"])
def test_dispatcher_cpu_backends(backend):
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[1, 3] = True
    ins = make_inputs(2, 3, 9, 4, init=True, reset=reset, seed=16)
    expect, elast = selective_scan_ref(**ins, delta_softplus=True, return_final_state=True)
    out, last = selective_scan(**ins, delta_softplus=True, return_final_state=True, backend=backend)
    torch.testing.assert_close(out, expect, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(last, elast, rtol=1e-6, atol=1e-6)
    only = selective_scan(**ins, delta_softplus=True, backend=backend)
    torch.testing.assert_close(only, expect, rtol=1e-9, atol=1e-9)


def test_auto_on_cpu_inputs_is_torch():
    assert resolve_backend("auto", "cpu") == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_backend_without_gpu_is_a_clear_error():
    ins = make_inputs(1, 2, 4, 2, seed=17)
    with pytest.raises(BackendError) as e:
        selective_scan(**ins, backend="cuda")
    assert isinstance(e.value, UserError)
    msg = str(e.value)
    assert "cuda" in msg and "GPU" in msg and "\n" not in msg


def test_unknown_backend_raises():
    ins = make_inputs(1, 2, 4, 2, seed=18)
    with pytest.raises(BackendError, match="unknown scan backend 'triton'"):
        selective_scan(**ins, backend="triton")


@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_chunked])
@pytest.mark.parametrize("name,bad", [
    ("u", torch.zeros(2, 3)),
    ("delta", torch.zeros(2, 3, 4)),
    ("A", torch.zeros(4, 4)),
    ("B", torch.zeros(2, 4, 6)),
    ("C", torch.zeros(1, 4, 5)),
    ("D", torch.zeros(4)),
    ("z", torch.zeros(2, 3, 6)),
    ("delta_bias", torch.zeros(2)),
    ("initial_state", torch.zeros(2, 3, 3)),
    ("reset", torch.zeros(2, 4, dtype=torch.bool)),
])
def test_shape_errors_name_the_argument(fn, name, bad):
    ins = make_inputs(2, 3, 5, 4, init=True, reset=torch.zeros(2, 5, dtype=torch.bool), seed=19,
                      dtype=torch.float32)
    ins[name] = bad
    with pytest.raises(ValueError, match=rf"\b{name} must"):
        fn(**ins)
