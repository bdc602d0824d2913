"""Data: everything becomes a uint8 symbol stream (see stream.py); this module picks the builder."""

from __future__ import annotations

from bytemamba.config import AudioConfig, Config, DataConfig
from bytemamba.data.stream import DataError, SymbolStream, WindowSampler

__all__ = ["DataError", "SymbolStream", "WindowSampler", "build_streams", "make_sampler"]


def build_streams(data: DataConfig, audio: AudioConfig) -> tuple[SymbolStream, SymbolStream]:
    """(train, validation) streams for the [data] section (and [audio], for audio data)."""
    if data.kind == "text":
        from bytemamba.data.text import build_text_streams
        return build_text_streams(data)
    from bytemamba.data.audio import build_audio_streams
    return build_audio_streams(data, audio)


def make_sampler(stream: SymbolStream, cfg: Config, split: str, rank: int = 0, world: int = 1) -> WindowSampler:
    """The window sampler of one split; validation always draws the same windows (seed fixed)."""
    t = cfg.train
    seed = t.seed if split == "train" else 0
    return WindowSampler(stream, t.seq_len, t.batch_size, seed, split, rank, world,
                         with_reset=cfg.data.doc_boundaries)
