"""Shared by the kernel tests (tests/ops): the relative error they assert on, and a model with weights moved
away from their inits (so that a wrong weight layout or a skipped term shows up in the outputs)."""

import torch

from bytemamba.config import ModelConfig
from bytemamba.models.lm import ByteMambaLM


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
