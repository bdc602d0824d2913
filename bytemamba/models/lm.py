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
        self.last_step_path = "torch"
        residual = self.backbone.embedding(ids.long()).float()           # (b, d)
        for layer, s in zip(self.backbone.layers, cache.layers):
            residual = layer.step(residual, s)
        cache.seqlen_offset += 1
        return self.lm_head(self.backbone.norm_f(residual)).float()

    # Batches up to this run the fused GEMV kernels (any batch, in tiles of 8 rows) instead of cuBLAS +
    # add_rmsnorm (4 launches a layer instead of 6). Measured on an H200 (docs/PERF.md, decoding): byte353m
    # batch 1 0.99 ms (GEMV) vs 1.86 ms (cuBLAS); batch 8 2.79 vs 2.11 ms and batch 64 12.3 vs 2.4 ms (on CUDA
    # cores the GEMV's FMAs, not its weight bytes, bound it from batch 8 on), hence 1.
    gemv_max_batch: int = 1

    # Batches up to this run the whole step as one kernel where the model has its shape (d_model 256,
    # d_state 16, ...: bytemamba.ops.fused_step.SHAPE) and the step computes in bf16/fp16: cuda/decode_fused.cu
    # (a cluster per row, `last_step_path` "fused") up to fused_step.ROWS_FROM rows, cuda/decode_fused_rows.cu
    # (a cluster per 16 or 24 rows, "fused-rows") above; measured faster than the unfused paths at every batch
    # timed, 1 to 256 (docs/PERF.md; not timed above 360). 0 (or BYTEMAMBA_FUSED_STEP=0) turns it off.
    fused_max_batch: int = 1 << 16
    last_step_path: str = ""

    def fused_step_reason(self, batch: int, device) -> str | None:
        """None where the fused one-kernel step applies to this batch, else why not (one line)."""
        import os

        from bytemamba.ops.fused_step import unsupported_reason
        if os.environ.get("BYTEMAMBA_FUSED_STEP", "1") in ("0", "false", "False"):
            return "fused step: turned off (BYTEMAMBA_FUSED_STEP=0)"
        if batch > self.fused_max_batch:
            return f"fused step: batch {batch} > fused_max_batch {self.fused_max_batch}"
        c, mixer = self.config, self.backbone.layers[0].mixer
        eps = {layer.norm.eps for layer in self.backbone.layers} | {self.backbone.norm_f.eps}
        if len(eps) != 1:
            return "fused step: the norms' eps differ"
        return unsupported_reason(d_model=c.d_model, d_inner=c.d_inner, d_state=c.d_state, dt_rank=mixer.dt_rank,
                                  d_conv=c.d_conv, vocab=c.vocab_size, dtype=mixer.step_dtype(),
                                  biases=mixer.in_proj.bias is not None or mixer.out_proj.bias is not None,
                                  device=device)

    def _fused_weights(self, dtype):
        """The stacked weights of the fused step, rebuilt when a parameter changes."""
        from bytemamba.ops.fused_step import PackCache, pack_weights
        stamp = (dtype,) + tuple((p.data_ptr(), p._version) for p in self.parameters())
        cache = self.__dict__.setdefault("_fused_pack", PackCache())     # not a submodule, not in state_dict
        if cache.entry is not None and cache.entry[0] == stamp:
            return cache.entry[1]
        layers = [dict(in_proj=m.in_proj.weight, conv_w=m.conv1d.weight, conv_b=m.conv1d.bias,
                       x_proj=m.x_proj.weight, dt_w=m.dt_proj.weight, dt_b=m.dt_proj.bias, A_log=m.A_log, D=m.D,
                       out_proj=m.out_proj.weight) for m in (layer.mixer for layer in self.backbone.layers)]
        norms = [layer.norm.weight for layer in self.backbone.layers] + [self.backbone.norm_f.weight]
        packed = pack_weights(self.backbone.embedding.weight, self.lm_head.weight, norms, layers,
                              self.backbone.norm_f.eps, dtype)
        cache.entry = (stamp, packed)
        return packed

    def _step_fused(self, ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        from bytemamba.ops.fused_step import choose_kernel, fused_step_fn
        for s in cache.layers:
            s.make_contiguous()
        W = self._fused_weights(self.backbone.layers[0].mixer.step_dtype())
        kernel = choose_kernel(ids.shape[0], len(cache.layers))
        logits = fused_step_fn(ids, W, [s.conv for s in cache.layers], [s.ssm for s in cache.layers], kernel=kernel)
        cache.seqlen_offset += 1
        self.last_step_path = "fused" if kernel == "cluster" else "fused-rows"
        return logits

    # Batches in this range (inclusive) run every layer of the step as ONE persistent kernel where the model has
    # its shape (byte353m's: bytemamba.ops.persistent_step.SHAPE) and the step computes in bf16/fp16,
    # cuda/decode_persistent.cu (`last_step_path` "persistent"). Measured on an H200 (docs/PERF.md, "byte353m
    # batch 64: persistent step kernel", v5): b 64 1.10 ms a step vs 1.80 ms (cuBLAS step), b 8 0.96 ms vs 1.41;
    # b 1 keeps the GEMV step (0.77 ms); the kernel takes at most 64 rows.
    # BYTEMAMBA_PERSISTENT_STEP=1 forces it on at every batch it supports, =0 off.
    persistent_batches: tuple = (8, 64)

    def persistent_step_reason(self, batch: int, device) -> str | None:
        """None where the persistent one-kernel step applies to this batch, else why not (one line)."""
        import os

        from bytemamba.ops.persistent_step import unsupported_reason
        env = os.environ.get("BYTEMAMBA_PERSISTENT_STEP", "")
        if env in ("0", "false", "False"):
            return "persistent step: turned off (BYTEMAMBA_PERSISTENT_STEP=0)"
        lo, hi = self.persistent_batches
        if env not in ("1", "true", "True") and not lo <= batch <= hi:
            return f"persistent step: batch {batch} outside persistent_batches {self.persistent_batches}"
        c, mixer = self.config, self.backbone.layers[0].mixer
        if len({layer.norm.eps for layer in self.backbone.layers} | {self.backbone.norm_f.eps}) != 1:
            return "persistent step: the norms' eps differ"
        return unsupported_reason(d_model=c.d_model, d_inner=c.d_inner, d_state=c.d_state, dt_rank=mixer.dt_rank,
                                  d_conv=c.d_conv, dtype=mixer.step_dtype(), batch=batch, n_layer=c.n_layer,
                                  biases=mixer.in_proj.bias is not None or mixer.out_proj.bias is not None,
                                  device=device)

    def _step_persistent(self, ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        from bytemamba.ops.persistent_step import persistent_step_fn
        for s in cache.layers:
            s.make_contiguous()
        W = self._fused_weights(self.backbone.layers[0].mixer.step_dtype())   # its persistent layout kept on W
        logits = persistent_step_fn(ids, W, [s.conv for s in cache.layers], [s.ssm for s in cache.layers])
        cache.seqlen_offset += 1
        self.last_step_path = "persistent"
        return logits

    def _step_cuda(self, ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        if self.fused_step_reason(ids.shape[0], ids.device) is None:
            return self._step_fused(ids, cache)
        if self.persistent_step_reason(ids.shape[0], ids.device) is None:
            return self._step_persistent(ids, cache)
        from bytemamba.ops.step import CastCache, add_rmsnorm_fn, embed_rows_fn, gemv_fn, gemv_supported
        casts = self.__dict__.setdefault("_step_casts", CastCache())
        layers, f32 = self.backbone.layers, torch.float32
        cdt = layers[0].mixer.step_dtype()
        emb = self.backbone.embedding.weight
        residual = torch.empty(ids.shape[0], emb.shape[1], device=emb.device, dtype=f32)
        norms = [layer.norm for layer in layers] + [self.backbone.norm_f]
        if ids.shape[0] <= self.gemv_max_batch and gemv_supported(ids.shape[0], self.config.d_model, self.config.d_inner,
                                                    dtype=cdt):
            self.last_step_path = "gemv"
            partial = embed_rows_fn(ids, casts.get(emb, f32), residual)
            for layer, s in zip(layers, cache.layers):
                partial = layer.mixer.step_small(residual, partial, layer.norm.weight, layer.norm.eps, s)
            cache.seqlen_offset += 1
            nf = self.backbone.norm_f
            return gemv_fn(casts.get(self.lm_head.weight, cdt),
                           norm=(residual, partial, casts.get(nf.weight, f32), nf.eps), out_f32=True)
        self.last_step_path = "cublas"
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
