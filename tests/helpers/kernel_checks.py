"""Shared by the kernel tests (tests/ops): the relative error they assert on, a model with weights moved away
from their inits (so that a wrong weight layout or a skipped term shows up in the outputs), its weights in the
fused steps' layout, random decode states, and two checks of the model's decode paths (teacher-forced steps,
graphs = no graphs)."""

import torch

from bytemamba.config import ModelConfig
from bytemamba.generate import Sampling, generate
from bytemamba.models.lm import ByteMambaLM
from bytemamba.ops.fused_step import pack_weights


def rel(a, b):
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def perturbed_model(d_model, n_layer=2, seed=0, device="cpu", backend="torch"):
    """A ByteMambaLM of this width with norms, A, D, conv biases and out_proj perturbed from their inits."""
    torch.manual_seed(seed)
    m = ByteMambaLM(ModelConfig(d_model=d_model, n_layer=n_layer, scan_backend=backend)).eval()
    with torch.no_grad():
        m.backbone.embedding.weight.normal_(0, 0.5)
        for layer in m.backbone.layers:
            mx = layer.mixer
            layer.norm.weight.add_(0.2 * torch.randn_like(layer.norm.weight))
            mx.A_log.add_(0.3 * torch.randn_like(mx.A_log))
            mx.D.normal_(1.0, 0.5)
            mx.conv1d.bias.normal_(0, 0.2)
            mx.out_proj.weight.mul_(2.0)
        m.backbone.norm_f.weight.add_(0.2 * torch.randn_like(m.backbone.norm_f.weight))
    return m.to(device)


def packed(m, dtype, round_to=None):
    """The model's weights in the fused layout; round_to: the big weights first rounded to that dtype."""
    layers = [dict(in_proj=x.in_proj.weight, conv_w=x.conv1d.weight, conv_b=x.conv1d.bias, x_proj=x.x_proj.weight,
                   dt_w=x.dt_proj.weight, dt_b=x.dt_proj.bias, A_log=x.A_log, D=x.D, out_proj=x.out_proj.weight)
              for x in (layer.mixer for layer in m.backbone.layers)]
    if round_to is not None:
        for lay in layers:
            for k in ("in_proj", "x_proj", "out_proj"):
                lay[k] = lay[k].to(round_to).float()
    norms = [layer.norm.weight for layer in m.backbone.layers] + [m.backbone.norm_f.weight]
    head = m.lm_head.weight if round_to is None else m.lm_head.weight.to(round_to).float()
    return pack_weights(m.backbone.embedding.weight, head, norms, layers, m.backbone.norm_f.eps, dtype)


def random_states(m, batch, device, seed=1):
    """A decode cache for `batch` rows with random conv and SSM states."""
    g = torch.Generator().manual_seed(seed)
    cache = m.empty_cache(batch, device)
    for s in cache.layers:
        s.conv.copy_(torch.randn(s.conv.shape, generator=g))
        s.ssm.copy_(torch.randn(s.ssm.shape, generator=g))
    return cache


def teacher_forced(m, prompt, ids, path_ok):
    """Prefill `prompt`, then step through ids[:, :-1] under bf16 autocast: the logits of every next symbol,
    (b, ids.shape[1], V) float32. After each step, path_ok(m.last_step_path) must hold."""
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits, cache = m.prefill(prompt)
        steps = [logits]
        for t in range(ids.shape[1] - 1):
            steps.append(m.step(ids[:, t], cache))
            assert path_ok(m.last_step_path), m.last_step_path
    return torch.stack(steps, 1).float()


def assert_graphs_match(m, prompt, new, path):
    """generate() with and without CUDA graphs (same seed): the same symbols and log-probabilities, the step
    having taken `path`."""
    s = Sampling(temperature=1.0)
    a, la = generate(m, prompt, new, s, seed=11, autocast=True, graphs=False)
    assert m.last_step_path == path
    b, lb = generate(m, prompt, new, s, seed=11, autocast=True, graphs=True)
    assert torch.equal(a, b) and torch.equal(la, lb)
