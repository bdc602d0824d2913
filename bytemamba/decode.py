"""Graph-captured decoding: one CUDA-graph replay per generated symbol.

A `GraphDecoder(model, batch_size, sampling)` owns static buffers for one batch size: the inference cache
(conv windows and SSM states, allocated once and updated in place by `model.step`), the current symbols,
the running log-probabilities and a CUDA generator. Its body

    logits = model.step(symbols, cache); new = sample_next(logits, sampling, generator);
    logp += log_softmax(logits)[new]; symbols <- new

(embedding, every layer, the head, temperature / top-k / top-p / min-p and the random draw) is warmed up
eagerly on a side stream, then captured once into a CUDA graph with the generator registered, so every
replay draws fresh random numbers exactly as the same calls made eagerly would: decoding with and without
graphs gives the same symbols for the same seed. On a GPU the sampling is by default one fused kernel
(`sample_fn`, its random numbers a hash of the seed and a step counter on the GPU; BYTEMAMBA_STEP_V2=0 keeps
`sample_next` and its generator). Decoders are kept per (model, batch size, sampling,
compute dtype) by `decoder_for` and rebuilt when a parameter of the model changes.

Usage (what `generate` does): `dec.load(cache, symbols, logp)` copies the prefill's state in, each
`dec.step()` advances every sequence by one symbol (`dec.symbols`, `dec.logp`).
"""

from __future__ import annotations

import torch

from bytemamba.generate import Sampling, sample_next


class GraphDecoder:
    def __init__(self, model, batch_size: int, sampling: Sampling, use_graph: bool = True):
        self.model = model
        self.batch_size = batch_size
        self.sampling = sampling
        self.device = next(model.parameters()).device
        self.use_graph = use_graph and self.device.type == "cuda"
        self.cache = model.empty_cache(batch_size, self.device)
        self.symbols = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.logp = torch.zeros(batch_size, dtype=torch.float64, device=self.device)
        self.generator = torch.Generator(device=self.device)
        self.graph = None
        self.stamp = param_stamp(model)
        # on a GPU (unless BYTEMAMBA_STEP_V2=0): one fused sampling kernel instead of ~20 PyTorch ops; its random
        # stream is its own (a hash of seed, step counter, row, symbol), so with it generate() decodes through
        # this decoder with or without graphs
        from bytemamba.ops.step import v2_kernels
        self.fused_sampler = self.device.type == "cuda" and v2_kernels()
        self.seed_t = torch.zeros(1, dtype=torch.long, device=self.device)
        self.counter = torch.zeros(1, dtype=torch.long, device=self.device)

    def _sample(self, logits, symbols_out, logp_acc):
        if self.fused_sampler:
            from bytemamba.ops.step import sample_fn
            s = self.sampling
            sample_fn(logits, s.temperature, s.top_k, s.top_p, s.min_p, self.seed_t, self.counter, symbols_out,
                      logp_acc)
            self.counter.add_(1)
            return symbols_out
        new = sample_next(logits, self.sampling, self.generator)
        logp_acc.add_(torch.log_softmax(logits.float(), -1).gather(-1, new[:, None])[:, 0].double())
        return symbols_out.copy_(new)

    def first(self, logits):
        """Sample from the prefill's logits with this decoder's sampler: (symbols, their log-probabilities)."""
        lp = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
        sym = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        return self._sample(logits, sym, lp), lp

    def _body(self):
        logits = self.model.step(self.symbols, self.cache)
        self._sample(logits, self.symbols, self.logp)

    @torch.no_grad()
    def capture(self, warmup: int = 2):
        """Warm up (compiles kernels, fills weight casts, creates library handles), then capture the body.
        Run it under the same autocast setting as the replays will be (the compute dtype is baked in)."""
        if not self.use_graph or self.graph is not None:
            return self
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        g.register_generator_state(self.generator)
        with torch.cuda.graph(g):
            self._body()
        self.graph = g
        return self

    def seed(self, seed: int) -> torch.Generator:
        self.generator.manual_seed(seed)
        self.seed_t.fill_(seed & 0x7FFFFFFFFFFFFFFF)
        self.counter.zero_()
        return self.generator

    @torch.no_grad()
    def load(self, cache, symbols: torch.Tensor, logp: torch.Tensor | None = None):
        """Start from another cache (the prefill's), the last sampled symbols and their log-probabilities."""
        for dst, src in zip(self.cache.layers, cache.layers):
            dst.conv.copy_(src.conv)
            dst.ssm.copy_(src.ssm)
        self.cache.seqlen_offset = cache.seqlen_offset
        self.symbols.copy_(symbols)
        if logp is None:
            self.logp.zero_()
        else:
            self.logp.copy_(logp)

    @torch.no_grad()
    def step(self):
        """Advance every sequence by one symbol (one graph replay, or the same calls eagerly)."""
        if self.graph is not None:
            self.graph.replay()
            self.cache.seqlen_offset += 1
        else:
            self._body()


def param_stamp(model) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


class _Decoders(dict):
    """A model's decoders; copying or pickling the model leaves them behind (graphs are per process)."""

    def __deepcopy__(self, memo):
        return _Decoders()

    def __reduce__(self):
        return (_Decoders, ())


def decoder_for(model, batch_size: int, sampling: Sampling) -> GraphDecoder:
    """The captured decoder for this model, batch size, sampling and compute dtype (built on first use)."""
    dev = next(model.parameters()).device
    cdt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
    from bytemamba.ops.step import v2_kernels
    key = (batch_size, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p, cdt,
           dev.type == "cuda" and v2_kernels())
    # kept on the model itself (not a module, not in its state_dict), so the graphs go when the model goes
    per_model = model.__dict__.setdefault("_graph_decoders", _Decoders())
    dec = per_model.get(key)
    if dec is None or dec.stamp != param_stamp(model):
        if dec is not None:
            per_model.clear()                      # weights changed: every graph of this model is stale
        dec = GraphDecoder(model, batch_size, sampling).capture()
        per_model[key] = dec
    return dec


def clear_decoders(model) -> None:
    """Drop a model's captured decoders, freeing their buffers and graph memory."""
    model.__dict__.pop("_graph_decoders", None)
