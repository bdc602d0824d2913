"""The embedded audio corpus: procedural music made deterministically from a seed, so the default audio
recipe runs with no download.

The corpus is a list of phrases (clips) of 1-3 seconds. A phrase is a melody of notes drawn from a
scale, each note a sum of harmonics with a per-note spectral tilt, an attack-decay-sustain-release
envelope and a vibrato, separated now and then by short rests (a breath of a quarter or half beat);
about a third of the phrases carry a second, lower voice. A phrase opens on a note, never on a rest.
Everything is a pure function of (seed, sample_rate, seconds): the same arguments give the same samples
bit for bit on every machine that has the same numpy.

Version 2, and why (measured in docs/PERF.md): a sampled clip starts, like every training phrase, from
the quantized zero with an empty state. With version 1's long rests (up to three beats) most of what the
model saw after silence was more silence, so below temperature 1 a small model never left the opening
silence, and at temperature 1 it was noise (spectral flatness ~0.5). Here silence is always soon followed
by a note, and the music sits lower and smoother (melody MIDI 48-72, no partial above 3 kHz, a steeper
spectral tilt), so the 0.1M-parameter CPU recipe follows it to ~2 bits per sample in a few minutes
(version 1: ~3.5).
"""

from __future__ import annotations

import numpy as np

SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "pentatonic": (0, 2, 4, 7, 9),
}
PHRASE_SECONDS = (1.0, 3.0)
MAX_PARTIAL_HZ = 3000.0     # no harmonic above this
SYNTH_VERSION = 2          # part of the prepared cache's key: bump whenever the samples change


def _note(rng: np.random.Generator, f0: float, n: int, sr: int) -> np.ndarray:
    """One note of n samples: harmonics x ADSR envelope, with vibrato."""
    t = np.arange(n) / sr
    vib_rate, vib_depth = rng.uniform(4.0, 7.0), rng.uniform(0.0, 0.006)
    freq = f0 * (1.0 + vib_depth * np.sin(2 * np.pi * vib_rate * t + rng.uniform(0, 2 * np.pi)))
    phase = 2 * np.pi * np.cumsum(freq) / sr
    tilt = rng.uniform(0.2, 0.5)
    wave = np.zeros(n)
    for k in range(1, 7):
        if k * f0 >= MAX_PARTIAL_HZ:
            break
        wave += tilt ** (k - 1) * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    wave /= max(np.max(np.abs(wave)), 1e-9)
    a = max(1, int(rng.uniform(0.004, 0.03) * sr))
    d = max(1, int(rng.uniform(0.04, 0.15) * sr))
    r = max(1, int(rng.uniform(0.02, 0.1) * sr))
    sustain = rng.uniform(0.35, 0.8)
    env = np.full(n, sustain)
    env[:min(a, n)] = np.linspace(0, 1, a, endpoint=False)[:n]
    if a < n:
        m = min(d, n - a)
        env[a:a + m] = np.linspace(1, sustain, d, endpoint=False)[:m]
    rr = min(r, n)
    env[n - rr:] *= np.linspace(1, 0, rr)
    return wave * env


def _voice(rng: np.random.Generator, n: int, sr: int, low: int, high: int, scale, root: int,
           beat: float, rest_p: float) -> np.ndarray:
    out = np.zeros(n)
    pos = 0
    first = True
    pitches = [m for m in range(low, high + 1) if (m - root) % 12 in scale]
    idx = int(rng.integers(len(pitches)))
    while pos < n:
        rest = not first and rng.random() < rest_p
        first = False
        dur = int(beat * (rng.choice([0.25, 0.5]) if rest else rng.choice([0.5, 1.0, 1.0, 2.0, 3.0])) * sr)
        dur = min(dur, n - pos)
        if dur <= 8:
            break
        if not rest:
            idx = int(np.clip(idx + rng.choice([-3, -2, -1, -1, 0, 1, 1, 2, 3]), 0, len(pitches) - 1))
            f0 = 440.0 * 2.0 ** ((pitches[idx] - 69) / 12.0)
            out[pos:pos + dur] += rng.uniform(0.35, 1.0) * _note(rng, f0, dur, sr)
        pos += dur
    return out


def synth_phrase(rng: np.random.Generator, sr: int, seconds: float) -> np.ndarray:
    n = int(round(seconds * sr))
    scale = SCALES[("major", "minor", "pentatonic")[int(rng.integers(3))]]
    root = int(rng.integers(0, 12))
    beat = 60.0 / rng.uniform(80, 180)
    x = _voice(rng, n, sr, 48, 72, scale, root, beat, rest_p=0.15)
    if rng.random() < 0.35:
        x += 0.6 * _voice(rng, n, sr, 36, 47, scale, root, beat * 2, rest_p=0.25)
    peak = np.max(np.abs(x))
    if peak > 0:
        x *= rng.uniform(0.3, 0.9) / peak
    return x.astype(np.float32)


def synth_corpus(seconds: float, seed: int = 0, sample_rate: int = 16000) -> list[np.ndarray]:
    """Phrases (float32 mono in [-1, 1]) totalling about `seconds` seconds."""
    rng = np.random.default_rng([seed, 0x5EED, sample_rate])
    clips, total = [], 0.0
    while total < seconds - 1e-9:
        left = seconds - total
        length = rng.uniform(*PHRASE_SECONDS)
        if left - length < PHRASE_SECONDS[0]:          # no shorter phrase at the end: the last takes the rest
            length = left
        clips.append(synth_phrase(rng, sample_rate, length))
        total += length
    return clips
