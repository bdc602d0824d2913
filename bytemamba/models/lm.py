"""ByteMambaLM: a Mamba stack over a 256-symbol alphabet (bytes or 8-bit audio codes).

    ids (b, l) --embedding--> (b, l, d) --[Block] x n_layer--> norm_f --lm_head--> logits (b, l, 256)

The LM head is tied to the embedding by default. Parameter names follow the public Mamba LM layout
(backbone.embedding.weight, backbone.layers.{i}.mixer.*, backbone.norm_f.weight, lm_head.weight).

Three ways to run it:
- `forward(ids, reset)`: the parallel path over whole windows (training, evaluation);
- `forward(ids, state=..., return_state=True)`: the same, starting from and returning an InferenceCache
  (prefill, streaming evaluation that carries context from window to window);
- `step(ids, cache)`: one symbol per sequence, the cache updated in place (decoding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bytemamba.config import ModelConfig
from bytemamba.modules.mamba import Block, MambaMixer, MixerState, RMSNorm


@dataclass
class InferenceCache:
    """Per-layer conv windows and SSM states, plus how many symbols each sequence has consumed."""
    layers: list[MixerState]
    seqlen_offset: int = 0

    @property
    def batch_size(self) -> int:
        return self.layers[0].ssm.shape[0]


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([
            Block(cfg.d_model, MambaMixer(
                cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                dt_rank=cfg.dt_rank_value, dt_min=cfg.dt_min, dt_max=cfg.dt_max,
                dt_init_floor=cfg.dt_init_floor, conv_bias=cfg.conv_bias, bias=cfg.bias,
                scan_backend=cfg.scan_backend), eps=cfg.rms_norm_eps)
            for _ in range(cfg.n_layer)])
        self.norm_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)


class ByteMambaLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def _init_weights(self):
        # As in the public Mamba LM: embedding N(0, 0.02); linear biases zero (dt_proj's bias keeps its
        # inverse-softplus init); out_proj scaled by 1/sqrt(n_layer) so the residual stream does not grow
        # with depth.
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and m.bias is not None and not name.endswith("dt_proj"):
                nn.init.zeros_(m.bias)
        for layer in self.backbone.layers:
            w = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            with torch.no_grad():
                w /= math.sqrt(self.config.n_layer)

    # ---- parallel path ----------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, reset: torch.Tensor | None = None,
                state: InferenceCache | None = None, return_state: bool = False):
        """ids (b, l) integer symbols -> logits (b, l, 256) float32 [, InferenceCache]."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, length), got shape {tuple(ids.shape)}")
        residual = self.backbone.embedding(ids.long()).float()           # (b, l, d) float32 stream
        new_layers = []
        for i, layer in enumerate(self.backbone.layers):
            layer_state = state.layers[i] if state is not None else None
            if return_state:
                residual, s = layer(residual, reset, layer_state, return_state=True)
                new_layers.append(s)
            else:
                residual = layer(residual, reset, layer_state)
        logits = self.lm_head(self.backbone.norm_f(residual)).float()
        if return_state:
            offset = (state.seqlen_offset if state is not None else 0) + ids.shape[1]
            return logits, InferenceCache(new_layers, offset)
        return logits

    # ---- recurrent path ---------------------------------------------------------------------------
    def empty_cache(self, batch: int, device=None) -> InferenceCache:
        device = device or self.backbone.embedding.weight.device
        return InferenceCache([layer.mixer.empty_state(batch, device) for layer in self.backbone.layers])

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, reset: torch.Tensor | None = None):
        """Run a prompt through the parallel path; return the last position's logits and the cache."""
        logits, cache = self.forward(ids, reset, return_state=True)
        return logits[:, -1], cache

    def step(self, ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """ids (b,) -> logits (b, 256) float32; the cache is updated in place.

        With the CUDA backend (see MambaMixer.step) the embedding, the residual adds and the RMSNorms run as
        one fused kernel between layers, and every mixer step as its fused kernels."""
        if self.backbone.layers[0].mixer.step_backend(ids.device) == "cuda":
            return self._step_cuda(ids, cache)
        residual = self.backbone.embedding(ids.long()).float()           # (b, d)
        for layer, s in zip(self.backbone.layers, cache.layers):
            residual = layer.step(residual, s)
        cache.seqlen_offset += 1
        return self.lm_head(self.backbone.norm_f(residual)).float()

    # Batches up to this (at most 8) run the fused GEMV kernels instead of cuBLAS + add_rmsnorm (4 launches a
    # layer instead of 6). Measured on an H200 (docs/PERF.md): faster at batch 1 for small models (audio6m
    # 0.230 vs 0.283 ms), even at batch 1 for byte353m (1.89 vs 1.86 ms), slower at batch 8 (the kernel is
    # latency-bound: too few bytes in flight per warp), hence 1.
    gemv_max_batch: int = 1

    def _step_cuda(self, ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        from bytemamba.ops.step import CastCache, add_rmsnorm_fn, embed_rows_fn, gemv_fn, gemv_supported
        casts = self.__dict__.setdefault("_step_casts", CastCache())
        layers, f32 = self.backbone.layers, torch.float32
        cdt = layers[0].mixer.step_dtype()
        emb = self.backbone.embedding.weight
        residual = torch.empty(ids.shape[0], emb.shape[1], device=emb.device, dtype=f32)
        norms = [layer.norm for layer in layers] + [self.backbone.norm_f]
        if ids.shape[0] <= self.gemv_max_batch and gemv_supported(ids.shape[0], self.config.d_model, self.config.d_inner,
                                                    dtype=cdt):
            partial = embed_rows_fn(ids, casts.get(emb, f32), residual)
            for layer, s in zip(layers, cache.layers):
                partial = layer.mixer.step_small(residual, partial, layer.norm.weight, layer.norm.eps, s)
            cache.seqlen_offset += 1
            nf = self.backbone.norm_f
            return gemv_fn(casts.get(self.lm_head.weight, cdt),
                           norm=(residual, partial, casts.get(nf.weight, f32), nf.eps), out_f32=True)
        h = add_rmsnorm_fn(residual, None, casts.get(norms[0].weight, f32), norms[0].eps, cdt, ids=ids,
                           embedding=casts.get(emb, f32))
        for i, (layer, s) in enumerate(zip(layers, cache.layers)):
            out = layer.mixer.step(h, s)
            h = add_rmsnorm_fn(residual, out, casts.get(norms[i + 1].weight, f32), norms[i + 1].eps, cdt)
        cache.seqlen_offset += 1
        return F.linear(h, casts.get(self.lm_head.weight, cdt)).float()

    # ---- bookkeeping ------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, path, device="cpu") -> "ByteMambaLM":
        from bytemamba.models.io import load_model
        return load_model(path, device=device)[0]

    def save_pretrained(self, path, extra: dict | None = None) -> None:
        from bytemamba.models.io import save_model
        save_model(self, path, extra)
