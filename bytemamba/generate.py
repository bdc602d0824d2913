"""Sampling and autoregressive generation: prefill the prompt through the parallel path, then decode
one symbol at a time through the recurrent step with a constant-size cache.

Sampling filters, applied in this order to the temperature-scaled distribution:
- top_k  (> 0): keep the k most likely symbols;
- top_p  (< 1): keep the smallest set of most likely symbols whose probability sums to at least p;
- min_p  (> 0): keep symbols whose *probability* is at least min_p times the largest probability
  (probabilities, not logits: the public code's comparison of logits is a known bug).
temperature 0 is greedy decoding.
"""

from __future__ import annotations

import codecs
import sys
from dataclasses import dataclass, fields

import torch

from bytemamba.errors import UserError


@dataclass
class Sampling:
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    @classmethod
    def from_config(cls, section) -> "Sampling":
        """The sampling fields of a recipe's [generate] section: a GenerateConfig, or the dict of it kept in
        an exported config.json; a field it lacks keeps Sampling's default."""
        get = section.get if isinstance(section, dict) else lambda k, d: getattr(section, k, d)
        return cls(**{f.name: get(f.name, f.default) for f in fields(cls)})

    def check(self) -> None:
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise UserError(f"--min-p must be in [0, 1), got {self.min_p}")


def filter_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits (b, v) -> probabilities (b, v) after temperature and the top-k / top-p / min-p filters."""
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_k > 0 and s.top_k < probs.shape[-1]:
        kth = torch.topk(probs, s.top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if s.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        csum = torch.cumsum(sorted_p, dim=-1)
        # keep a symbol if the mass strictly before it is < top_p (the most likely one is always kept)
        keep_sorted = (csum - sorted_p) < s.top_p * csum[:, -1:]
        keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    if s.min_p > 0.0:
        top = probs.max(dim=-1, keepdim=True).values
        probs = torch.where(probs >= s.min_p * top, probs, torch.zeros_like(probs))
    return probs / probs.sum(dim=-1, keepdim=True)


def sample_next(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (b, v) -> symbols (b,) int64."""
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(filter_probs(logits, s), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompt: torch.Tensor, n_new: int, sampling: Sampling, seed: int = 0,
             on_step=None, autocast: bool = False, graphs: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt (b, l >= 1) -> (new symbols (b, n_new) int64, their log-probabilities under the model (b,)).

    `on_step(i, symbols)` is called after each new symbol (streaming output, progress bars).
    `graphs`: on a GPU, every step after the first (model step + sampling) is one CUDA-graph replay
    (bytemamba/decode.py; graphs cached per batch size); the symbols are the same as without. On CPU
    graphs are simply off.
    """
    sampling.check()
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise UserError("generation needs a prompt of at least one symbol")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else torch.autocast(device.type, enabled=False)
    out = torch.empty(prompt.shape[0], n_new, dtype=torch.long, device=device)
    logp = torch.zeros(prompt.shape[0], dtype=torch.float64, device=device)
    with ctx:
        logits, cache = model.prefill(prompt.to(device))
        from bytemamba.ops.step import v2_kernels
        use_graph = graphs and n_new > 1
        if device.type == "cuda" and (use_graph or v2_kernels()):
            from bytemamba.decode import GraphDecoder, decoder_for
            dec = (decoder_for(model, prompt.shape[0], sampling) if use_graph
                   else GraphDecoder(model, prompt.shape[0], sampling, use_graph=False))   # v2 sampler, eager
            dec.seed(seed)
            sym, lp = dec.first(logits)
            logp += lp
            out[:, 0] = sym
            if on_step is not None:
                on_step(0, sym)
            dec.load(cache, sym, logp)
            for i in range(1, n_new):
                dec.step()
                out[:, i] = dec.symbols
                if on_step is not None:
                    on_step(i, out[:, i])
            logp.copy_(dec.logp)
            return out, logp
        for i in range(n_new):
            sym = sample_next(logits, sampling, gen)
            logp += torch.log_softmax(logits.float(), -1).gather(-1, sym[:, None])[:, 0].double()
            out[:, i] = sym
            if on_step is not None:
                on_step(i, sym)
            if i + 1 < n_new:
                logits = model.step(sym, cache)
    return out, logp


def generate_text(model, prompt: str, max_bytes: int, sampling: Sampling, seed: int = 0,
                  num_samples: int = 1, stream=None, graphs: bool = True) -> list[str]:
    """Generate `num_samples` continuations of `prompt` (UTF-8). With one sample and a `stream`, the
    decoded text is written to it as it comes (invalid UTF-8 sequences replaced)."""
    raw = prompt.encode("utf-8") or b"\n"          # an empty prompt starts from a newline
    device = next(model.parameters()).device
    ids = torch.tensor(list(raw), dtype=torch.long, device=device).repeat(num_samples, 1)
    on_step = None
    if stream is not None and num_samples == 1:
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def on_step(i, sym):
            stream.write(dec.decode(bytes([int(sym[0])])))
            stream.flush()
    new, _ = generate(model, ids, max_bytes, sampling, seed, on_step=on_step,
                      autocast=device.type == "cuda", graphs=graphs)
    texts = [bytes(row.tolist()).decode("utf-8", errors="replace") for row in new.cpu()]
    if stream is not None and num_samples == 1:
        stream.write("\n")
    return texts


def print_samples(prompt: str, texts: list[str], stream=sys.stdout) -> None:
    for i, t in enumerate(texts):
        stream.write(f"--- sample {i + 1} ---\n{prompt}{t}\n")
    stream.flush()
