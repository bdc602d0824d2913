"""Benchmark-only baseline: a GPT-style Transformer over 256 symbols that decodes with a KV cache through
`scaled_dot_product_attention` (bench generate compares our Mamba decoding against it; never trained).

Pre-norm blocks (LayerNorm, fused QKV projection, SDPA, output projection, LayerNorm, 4x GELU MLP), learned
absolute positions, head tied to the embedding. Decoding is measured at a fixed context: the cache holds
`context` earlier positions (random keys and values: the cost does not depend on them) and each step writes
its own key and value into slot `context`, then attends over all context + 1 slots. Every buffer is static,
so one step (embedding, all layers, head, sampling) is captured into one CUDA graph like the Mamba step.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc1 = nn.Linear(d, 4 * d, bias=False)
        self.fc2 = nn.Linear(4 * d, d, bias=False)

    def step(self, x, k_cache, v_cache, slot: int):
        """x (b, d); caches (b, h, slot + 1, hd), slot `slot` written here."""
        b, d = x.shape
        h = self.n_head
        q, k, v = self.qkv(self.ln1(x)).view(b, 3, h, d // h).unbind(1)        # (b, h, hd) each
        k_cache[:, :, slot].copy_(k)
        v_cache[:, :, slot].copy_(v)
        a = F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache)      # (b, h, 1, hd)
        x = x + self.proj(a.reshape(b, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class KVTransformer(nn.Module):
    def __init__(self, d_model: int, n_layer: int, n_head: int, vocab: int = 256, max_len: int = 4096):
        super().__init__()
        self.d_model, self.n_layer, self.n_head = d_model, n_layer, n_head
        self.embedding = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList([_Block(d_model, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.embedding.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def num_parameters(self, with_positions: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if with_positions else n - self.pos.weight.numel()

    def empty_cache(self, batch: int, context: int, device, dtype):
        """Random keys / values for `context` earlier positions, plus the slot the step writes."""
        hd = self.d_model // self.n_head
        shape = (self.n_layer, batch, self.n_head, context + 1, hd)
        return (torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype))

    def step(self, ids, pos_ids, cache):
        """ids (b,), pos_ids (b,) -> logits (b, vocab) float32."""
        k_all, v_all = cache
        slot = k_all.shape[3] - 1
        x = self.embedding(ids) + self.pos(pos_ids)
        for i, layer in enumerate(self.layers):
            x = layer.step(x, k_all[i], v_all[i], slot)
        return self.head(self.ln_f(x)).float()
