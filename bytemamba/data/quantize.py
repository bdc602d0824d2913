"""Audio quantizers: float samples in [-1, 1] <-> uint8 symbols, each with its exact inverse.

- `mulaw8`  8-bit mu-law (mu = 255), as in WaveNet, SaShiMi and Mamba's audio experiments:
            y = sign(x) ln(1 + mu|x|) / ln(1 + mu), code = floor((y + 1) / 2 * mu + 1/2).
            decode(code) is the companded grid point; encode(decode(c)) == c for every code, and
            decode(encode(x)) lies within one step of the grid around x.
- `linear8` 8-bit linear, offset binary like 8-bit WAV: code = clip(round(128 x) + 128, 0, 255),
            decode(c) = (c - 128) / 128.
- `pcm16`   16-bit PCM as two symbols per sample, high byte then low byte, of the offset-binary value
            u = s + 32768 (s = clip(round(32768 x), -32768, 32767)). Offset binary keeps the high byte
            monotone in amplitude (zero is 0x80 0x00), so the first byte of a sample is a coarse
            8-bit linear code and the second refines it. Bit-exact for 16-bit sources.

The quantized zero (`zero_symbols`) starts every clip in a prepared stream and every unconditional
generation.
"""

from __future__ import annotations

import numpy as np

from bytemamba.errors import UserError

QUANTIZERS = ("mulaw8", "linear8", "pcm16")
MU = 255


def _check(name: str) -> None:
    if name not in QUANTIZERS:
        raise UserError(f"unknown audio quantizer {name!r} (known: {', '.join(QUANTIZERS)})")


def bytes_per_sample(name: str) -> int:
    _check(name)
    return 2 if name == "pcm16" else 1


# ---- mu-law ---------------------------------------------------------------------------------------

def mulaw_encode(x: np.ndarray) -> np.ndarray:
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    y = np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU)
    return np.clip(np.floor((y + 1.0) * 0.5 * MU + 0.5), 0, 255).astype(np.uint8)


def mulaw_decode(codes: np.ndarray) -> np.ndarray:
    y = np.asarray(codes, dtype=np.float64) / MU * 2.0 - 1.0
    return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(MU)) / MU).astype(np.float32)


# ---- 8-bit linear ---------------------------------------------------------------------------------

def linear8_encode(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.clip(np.round(x * 128.0) + 128.0, 0, 255).astype(np.uint8)


def linear8_decode(codes: np.ndarray) -> np.ndarray:
    return ((np.asarray(codes, dtype=np.float32) - 128.0) / 128.0).astype(np.float32)


# ---- 16-bit PCM as two bytes ----------------------------------------------------------------------

def float_to_int16(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def pcm16_encode_int(s: np.ndarray) -> np.ndarray:
    """int16 samples (n,) -> uint8 symbols (2n,): high byte, low byte of s + 32768."""
    u = np.asarray(s, dtype=np.int16).astype(np.int32) + 32768
    out = np.empty(2 * u.shape[0], dtype=np.uint8)
    out[0::2] = (u >> 8).astype(np.uint8)
    out[1::2] = (u & 0xFF).astype(np.uint8)
    return out


def pcm16_decode_int(codes: np.ndarray) -> np.ndarray:
    """uint8 symbols (2n,) -> int16 samples (n,). A trailing odd byte is dropped."""
    c = np.asarray(codes, dtype=np.int32)
    c = c[: c.shape[0] // 2 * 2]
    return ((c[0::2] << 8) + c[1::2] - 32768).astype(np.int16)


def pcm16_encode(x: np.ndarray) -> np.ndarray:
    return pcm16_encode_int(float_to_int16(x))


def pcm16_decode(codes: np.ndarray) -> np.ndarray:
    return (pcm16_decode_int(codes).astype(np.float32) / 32768.0).astype(np.float32)


# ---- dispatch -------------------------------------------------------------------------------------

_ENC = {"mulaw8": mulaw_encode, "linear8": linear8_encode, "pcm16": pcm16_encode}
_DEC = {"mulaw8": mulaw_decode, "linear8": linear8_decode, "pcm16": pcm16_decode}


def peak_normalize(x: np.ndarray, peak: float = 0.99) -> np.ndarray:
    """Scale a clip so its largest |sample| is `peak` (silence is left as it is)."""
    m = float(np.max(np.abs(x))) if x.size else 0.0
    if m <= 1e-8:
        return np.asarray(x, dtype=np.float32)
    return (np.asarray(x, dtype=np.float64) * (peak / m)).astype(np.float32)


def quantize(x: np.ndarray, name: str, normalize: bool = False) -> np.ndarray:
    """float samples (n,) in [-1, 1] -> uint8 symbols (n * bytes_per_sample,)."""
    _check(name)
    if normalize:
        x = peak_normalize(x)
    return _ENC[name](x)


def dequantize(codes: np.ndarray, name: str) -> np.ndarray:
    """uint8 symbols -> float32 samples in [-1, 1]."""
    _check(name)
    return _DEC[name](codes)


def zero_symbols(name: str) -> np.ndarray:
    """The symbols of one silent sample: what a clip starts from."""
    return quantize(np.zeros(1, dtype=np.float32), name)


def describe_bits(bits_per_symbol: float, kind: str, quantizer: str = "mulaw8") -> str:
    """A validation figure in the units of the stream: bytes for text, samples for audio (and both for
    pcm16, where a sample is two symbols)."""
    if kind != "audio":
        return f"{bits_per_symbol:.4f} bits per byte"
    if bytes_per_sample(quantizer) == 2:
        return f"{bits_per_symbol:.4f} bits per byte ({2 * bits_per_symbol:.4f} bits per sample)"
    return f"{bits_per_symbol:.4f} bits per sample"
