"""Symbol streams: a `uint8` array (usually a numpy memmap) plus the offsets where documents begin.

Text files, folders of files and prepared audio all become a `SymbolStream`. Training draws random
windows of length+1 from it; a window's `reset` flags mark the positions where a document (or clip)
begins, so the model never carries state across two documents packed into one window.

Sampling is a pure function of (seed, step, micro-step) for the *global* batch, and each rank takes its
slice of it: a resumed run sees exactly the batches it would have seen, and N processes with batch B see
the same examples as one process with batch N*B.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from bytemamba.errors import UserError


class DataError(UserError, ValueError):
    """Unusable data: a missing or empty path, nothing left after filtering, a stream too short."""


@dataclass
class SymbolStream:
    data: np.ndarray                                   # uint8, (n,)
    doc_starts: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    name: str = "stream"

    def __post_init__(self):
        if self.data.dtype != np.uint8:
            raise DataError(f"{self.name}: symbol streams are uint8, got {self.data.dtype}")
        self.doc_starts = np.asarray(self.doc_starts, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def reset_flags(self, start: int, length: int) -> np.ndarray:
        """Bool (length,): True where a document begins inside [start, start + length)."""
        flags = np.zeros(length, dtype=bool)
        lo = np.searchsorted(self.doc_starts, start, side="left")
        hi = np.searchsorted(self.doc_starts, start + length, side="left")
        flags[self.doc_starts[lo:hi] - start] = True
        return flags

    def doc_spans(self) -> list[tuple[int, int]]:
        ends = list(self.doc_starts[1:]) + [len(self)]
        return [(int(s), int(e)) for s, e in zip(self.doc_starts, ends)]

    def window_starts(self, rng: np.random.Generator, count: int, seq_len: int) -> np.ndarray:
        """`count` random window starts with room for seq_len + 1 symbols."""
        hi = len(self) - (seq_len + 1)
        if hi < 0:
            raise DataError(f"{self.name}: {len(self)} symbols, fewer than one window of {seq_len + 1}")
        return rng.integers(0, hi + 1, size=count)

    def windows(self, starts: np.ndarray, seq_len: int, with_reset: bool = True):
        """Stack windows: ids (b, seq_len + 1) int64, reset (b, seq_len) bool or None."""
        ids = np.stack([np.asarray(self.data[s:s + seq_len + 1]) for s in starts]).astype(np.int64)
        reset = np.stack([self.reset_flags(int(s), seq_len) for s in starts]) if with_reset else None
        return ids, reset


class WindowSampler:
    """Deterministic random windows: batch (step, micro) of rank r is a pure function of its inputs."""

    SPLIT_IDS = {"train": 0, "val": 1}

    def __init__(self, stream: SymbolStream, seq_len: int, batch_size: int, seed: int,
                 split: str = "train", rank: int = 0, world_size: int = 1, with_reset: bool = True,
                 start_fn=None):
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.seed, self.split, self.rank, self.world_size = seed, split, rank, world_size
        self.with_reset = with_reset
        # how window starts are drawn; audio swaps in clip-aligned starts for short-clip sets
        self.start_fn = start_fn or stream.window_starts
        self.start_fn(np.random.default_rng(0), 1, seq_len)     # fail early if the stream is too short

    def starts(self, step: int, micro: int = 0) -> np.ndarray:
        """Window starts of this rank's slice of global batch (step, micro)."""
        split_id = self.SPLIT_IDS.get(self.split, zlib.crc32(self.split.encode()))
        rng = np.random.default_rng([self.seed, split_id, step, micro])
        global_starts = self.start_fn(rng, self.batch_size * self.world_size, self.seq_len)
        return global_starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def batch(self, step: int, micro: int = 0) -> dict:
        ids, reset = self.stream.windows(self.starts(step, micro), self.seq_len, self.with_reset)
        ids = torch.from_numpy(ids)
        out = {"input": ids[:, :-1], "target": ids[:, 1:]}
        if reset is not None:
            out["reset"] = torch.from_numpy(reset)
        return out
