"""Streaming evaluation: the model's NLL of whole files, in bits per symbol.

Each file is read in windows; the recurrent state (conv window + SSM state of every layer) is carried
from one window to the next, so every symbol is predicted from *all* that precedes it in its file: the
figure is the true streaming NLL, not an average over truncated contexts. The first symbol of each file
has no context and is not scored.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bytemamba.data.stream import DataError

LN2 = math.log(2.0)


@torch.no_grad()
def stream_nll(model, symbols: np.ndarray, window: int = 2048, progress=None) -> tuple[float, int]:
    """Sum of -log2 p(symbol | everything before it) over symbols[1:], and the count scored."""
    n = len(symbols)
    if n < 2:
        return 0.0, 0
    device = next(model.parameters()).device
    use_amp = device.type == "cuda"
    total, cache = 0.0, None
    for s in range(0, n - 1, window):
        e = min(s + window, n - 1)
        chunk = torch.from_numpy(np.asarray(symbols[s:e + 1], dtype=np.int64)).to(device)[None]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits, cache = model(chunk[:, :-1], state=cache, return_state=True)
        total += F.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum").item() / LN2
        if progress is not None:
            progress.update(e - s)
    return total, n - 1


def eval_files(model, files: list[Path], window: int = 2048, read=None) -> dict:
    """Bits per symbol over each file and over all of them. `read(path) -> uint8 array` decodes a file
    (bytes as they are by default; audio supplies its own)."""
    from tqdm.auto import tqdm

    read = read or (lambda p: np.fromfile(p, dtype=np.uint8))
    arrays = [(p, read(p)) for p in files]
    total_sym = sum(max(len(a) - 1, 0) for _, a in arrays)
    if total_sym == 0:
        raise DataError("nothing to evaluate: the data holds fewer than two symbols per file")
    per_file, bits = {}, 0.0
    with tqdm(total=total_sym, unit="sym", unit_scale=True, dynamic_ncols=True) as bar:
        for p, a in arrays:
            b, c = stream_nll(model, a, window, bar)
            if c:
                per_file[str(p)] = b / c
            bits += b
    return {"bits_per_symbol": bits / total_sym, "symbols": total_sym, "files": per_file}


def list_files(path: str | Path, pattern: str = "*") -> list[Path]:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path not found: {p}")
    if p.is_file():
        if p.stat().st_size == 0:
            raise DataError(f"data file is empty: {p}")
        return [p]
    files = sorted(f for f in p.rglob(pattern) if f.is_file() and f.stat().st_size > 0)
    if not files:
        raise DataError(f"data folder {p} holds no non-empty files matching {pattern!r}")
    return files
