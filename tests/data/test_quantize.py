"""Quantizers: exact inverses, error within one step, byte order, agreement with torchaudio's mu-law."""

from pathlib import Path

import numpy as np
import pytest
import torch

from bytemamba.data.quantize import (bytes_per_sample, dequantize, describe_bits, linear8_decode,
                                     linear8_encode, mulaw_decode, mulaw_encode, pcm16_decode_int,
                                     pcm16_encode, pcm16_encode_int, peak_normalize, quantize, zero_symbols)
from bytemamba.errors import UserError

DIGITS = Path(__file__).resolve().parents[3] / "shared" / "data" / "audio" / "digits_synth"
ALL = np.arange(256, dtype=np.uint8)


def _ramp(n=200_001):
    x = np.linspace(-1, 1, n)
    rng = np.random.default_rng(0)
    tiny = rng.normal(0, 1e-3, 5000)
    return np.concatenate([x, tiny, [0.0, -0.0, 1.0, -1.0, 1e-9, -1e-9]])


def test_mulaw_codes_are_exact_fixed_points():
    assert np.array_equal(mulaw_encode(mulaw_decode(ALL)), ALL)
    assert mulaw_decode(ALL)[0] == -1.0 and abs(mulaw_decode(ALL)[255] - 1.0) < 1e-6
    assert np.all(np.diff(mulaw_decode(ALL)) > 0)          # strictly increasing grid


def test_mulaw_error_within_its_step():
    x = _ramp()
    c = mulaw_encode(x).astype(int)
    grid = mulaw_decode(ALL).astype(np.float64)
    lo = grid[np.maximum(c - 1, 0)]
    hi = grid[np.minimum(c + 1, 255)]
    assert np.all((lo <= x + 1e-7) & (x <= hi + 1e-7))
    # near zero the grid is fine: mu-law keeps small amplitudes (unlike 8-bit linear)
    small = np.abs(x) < 1e-3
    assert np.max(np.abs(x[small] - mulaw_decode(c[small]))) < 0.02 / 128      # 2% of a linear step
    assert np.all(np.diff(mulaw_encode(np.linspace(-1, 1, 10001)).astype(int)) >= 0)   # monotone


def test_mulaw_matches_torchaudio():
    import torchaudio.functional as AF

    x = _ramp()
    ours = mulaw_encode(x).astype(np.int64)
    theirs = AF.mu_law_encoding(torch.from_numpy(x), 256).numpy()
    # the same formula; floating-point rounding may differ at exact half-steps only
    assert np.mean(ours == theirs) > 0.9999 and np.max(np.abs(ours - theirs)) <= 1
    dec = AF.mu_law_decoding(torch.from_numpy(ALL.astype(np.int64)), 256).numpy()
    np.testing.assert_allclose(mulaw_decode(ALL), dec, atol=1e-6)


def test_linear8_exact_inverse_and_half_step():
    assert np.array_equal(linear8_encode(linear8_decode(ALL)), ALL)
    x = np.linspace(-1, 127 / 128, 100_001)
    assert np.max(np.abs(linear8_decode(linear8_encode(x)) - x)) <= 1 / 256 + 1e-9
    assert linear8_encode(np.array([1.0]))[0] == 255 and linear8_encode(np.array([-1.0]))[0] == 0


def test_pcm16_bit_exact_for_every_value_and_byte_order():
    s = np.arange(-32768, 32768, dtype=np.int16)
    sym = pcm16_encode_int(s)
    assert sym.dtype == np.uint8 and len(sym) == 2 * len(s)
    assert np.array_equal(pcm16_decode_int(sym), s)
    # high byte first, offset binary: zero is 0x80 0x00, monotone in the high byte
    assert list(pcm16_encode_int(np.array([0, 1, -1, -32768, 32767], dtype=np.int16))) == \
        [0x80, 0x00, 0x80, 0x01, 0x7F, 0xFF, 0x00, 0x00, 0xFF, 0xFF]
    assert np.all(np.diff(sym[0::2].astype(int)) >= 0)
    # the float path is bit-exact for 16-bit values (k / 32768 is exact in float32)
    f = (s.astype(np.float32) / 32768.0)
    assert np.array_equal(pcm16_encode(f), sym)
    assert np.array_equal(dequantize(sym, "pcm16"), f)


@pytest.mark.skipif(not DIGITS.is_dir(), reason=f"real audio not available at {DIGITS}")
def test_real_audio_round_trips():
    import soundfile as sf

    from bytemamba.data.audio import read_audio

    f = sorted((DIGITS / "train").glob("*.flac"))[0]
    ints, sr = sf.read(f, dtype="int16")
    x, meta = read_audio(f, 16000)
    assert sr == 16000 and meta["original_rate"] == 16000
    # PCM16: the decoded FLAC's 16-bit samples come back bit for bit
    assert np.array_equal(pcm16_decode_int(quantize(x, "pcm16")), ints)
    # mu-law on real speech: every sample within its step, and a speech-grade SNR
    c = quantize(x, "mulaw8")
    y = dequantize(c, "mulaw8")
    assert np.array_equal(quantize(y, "mulaw8"), c)
    loud = np.abs(x) > 0.01
    snr = 10 * np.log10(np.sum(x[loud] ** 2) / np.sum((x[loud] - y[loud]) ** 2))
    assert snr > 30, snr


def test_zero_symbols_and_sizes():
    assert list(zero_symbols("mulaw8")) == [128]
    assert list(zero_symbols("linear8")) == [128]
    assert list(zero_symbols("pcm16")) == [0x80, 0x00]
    assert bytes_per_sample("pcm16") == 2 and bytes_per_sample("mulaw8") == 1
    assert len(quantize(np.zeros(10), "pcm16")) == 20
    with pytest.raises(UserError, match="unknown audio quantizer"):
        quantize(np.zeros(3), "mp3")


def test_peak_normalisation():
    x = np.array([0.1, -0.25, 0.05], dtype=np.float32)
    y = peak_normalize(x)
    assert np.isclose(np.max(np.abs(y)), 0.99) and np.allclose(y / y[0], x / x[0])
    assert np.array_equal(peak_normalize(np.zeros(4, dtype=np.float32)), np.zeros(4))
    assert np.array_equal(quantize(x, "mulaw8", normalize=True), mulaw_encode(y))


def test_describe_bits_units():
    assert describe_bits(1.5, "text") == "1.5000 bits per byte"
    assert describe_bits(1.5, "audio", "mulaw8") == "1.5000 bits per sample"
    assert describe_bits(1.5, "audio", "pcm16") == "1.5000 bits per byte (3.0000 bits per sample)"
