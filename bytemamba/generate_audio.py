"""Audio generation: N clips in one batch, unconditional (from the quantized zero that starts every training
clip) or continuing a prompt audio file, each written as a WAV at the model's rate plus a PNG of its
waveform and spectrogram, and `samples.json` listing the clips ranked by the model's own log-likelihood
(best first; SaShiMi discards the worst samples this way).

The PNG is drawn here with numpy and written with zlib (no plotting library): the waveform's min/max
envelope on top, the log-magnitude spectrogram (frequency up, time right) below.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from bytemamba.config import AudioConfig, section_from_dict
from bytemamba.data.quantize import bytes_per_sample, dequantize, zero_symbols
from bytemamba.errors import UserError
from bytemamba.generate import Sampling, generate


def audio_config_of(meta: dict, source: str = "config.json") -> AudioConfig:
    """The [audio] block an audio model was trained with (rate, quantizer ...)."""
    if meta.get("data", {}).get("kind") != "audio":
        raise UserError(f"{source}: not an audio model (data.kind is {meta.get('data', {}).get('kind', 'text')!r})")
    return section_from_dict(AudioConfig, meta.get("audio", {}), f"{source} [audio]")


# ---- PNG --------------------------------------------------------------------------------------------

def write_png(path, rgb: np.ndarray) -> None:
    """Write an (h, w, 3) uint8 image as an 8-bit RGB PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)


_RAMP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                  [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float64)   # dark -> bright


def _colormap(v: np.ndarray) -> np.ndarray:
    """v in [0, 1] -> RGB uint8 along a perceptual dark-to-bright ramp."""
    pos = np.clip(v, 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(pos.astype(int), len(_RAMP) - 2)
    f = (pos - i)[..., None]
    return (_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).astype(np.uint8)


def log_spectrogram(x: np.ndarray, n_fft: int = 512, hop: int = 128) -> np.ndarray:
    """(freq, time) log10 power of a mono clip (torchaudio's Spectrogram)."""
    import torchaudio

    spec = torchaudio.transforms.Spectrogram(n_fft=n_fft, hop_length=hop, power=2.0)
    t = torch.from_numpy(np.asarray(x, dtype=np.float32))
    if t.numel() < n_fft:
        t = torch.nn.functional.pad(t, (0, n_fft - t.numel()))
    return torch.log10(spec(t) + 1e-10).numpy()


def render_png(path, x: np.ndarray, sample_rate: int, width: int = 800, wave_h: int = 160,
               spec_h: int = 256) -> None:
    """Waveform (min/max per pixel column) above the log spectrogram."""
    x = np.asarray(x, dtype=np.float32)
    img = np.full((wave_h + 2 + spec_h, width, 3), 255, dtype=np.uint8)
    # waveform
    mid = wave_h // 2
    img[mid, :] = (200, 200, 200)
    if len(x):
        edges = np.linspace(0, len(x), width + 1).astype(int)
        for c in range(width):
            seg = x[edges[c]:max(edges[c + 1], edges[c] + 1)]
            lo, hi = float(seg.min()), float(seg.max())
            y0 = int(round(mid - hi * (mid - 2)))
            y1 = int(round(mid - lo * (mid - 2)))
            img[max(0, min(y0, y1)):min(wave_h, max(y0, y1) + 1), c] = (31, 90, 160)
    img[wave_h:wave_h + 2, :] = (0, 0, 0)
    # spectrogram: frequency bins resampled to spec_h rows (low frequencies at the bottom)
    s = log_spectrogram(x) if len(x) else np.zeros((257, 1))
    top = s.max()
    v = np.clip((s - (top - 8.0)) / 8.0, 0, 1)                # an 80 dB range under the peak
    rows = np.linspace(v.shape[0] - 1, 0, spec_h).round().astype(int)
    cols = np.linspace(0, v.shape[1] - 1, width).round().astype(int)
    img[wave_h + 2:] = _colormap(v[rows][:, cols])
    write_png(path, img)


# ---- measures (used by tests and the JSON) --------------------------------------------------------

def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(x, dtype=np.float64))))) if len(x) else 0.0


def spectral_flatness(x: np.ndarray, n_fft: int = 512) -> float:
    """Geometric over arithmetic mean of the average power spectrum: ~1 for white noise, ~0 for tones."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x) // n_fft
    if n == 0:
        return float("nan")
    frames = x[:n * n_fft].reshape(n, n_fft) * np.hanning(n_fft)
    p = (np.abs(np.fft.rfft(frames, axis=1)) ** 2).mean(axis=0)[1:] + 1e-12
    return float(np.exp(np.mean(np.log(p))) / np.mean(p))


def piece_measures(clips, seconds: float, sample_rate: int) -> tuple[list[float], list[float]]:
    """RMS and spectral flatness of every whole `seconds`-long piece of each clip, cut from the clip's start
    (a generated clip starts where a training clip does, from the quantized zero): the range that
    generated clips of that length are compared with. Pass the clips as the model saw them (after the
    quantizer's round trip): the model cannot be cleaner than its quantizer."""
    n = int(round(seconds * sample_rate))
    pieces = [c[i:i + n] for c in clips for i in range(0, len(c) - n + 1, n)]
    return [rms(p) for p in pieces], [spectral_flatness(p) for p in pieces]


# ---- generation -----------------------------------------------------------------------------------

def prompt_symbols(audio: AudioConfig, prompt_wav=None) -> np.ndarray:
    """The symbols generation starts from: the quantized zero, then the prompt's samples if any."""
    if prompt_wav is None:
        return zero_symbols(audio.quantizer)
    from bytemamba.data.audio import AudioReadError, read_symbols
    try:
        return read_symbols(prompt_wav, audio)
    except AudioReadError as e:
        raise UserError(f"--prompt-wav: {e}") from None


def generate_audio(model, meta: dict, seconds: float, num_samples: int, out_dir, prompt_wav=None,
                   sampling: Sampling | None = None, seed: int = 0, progress: bool = True,
                   graphs: bool = True) -> list[dict]:
    """Generate `num_samples` clips of `seconds` each; write WAVs, PNGs and samples.json under out_dir.

    Returns the clip records, best log-likelihood first.
    """
    import soundfile as sf
    from tqdm.auto import tqdm

    audio = audio_config_of(meta)
    sampling = sampling or Sampling()
    sampling.check()
    if not seconds > 0 or not math.isfinite(seconds):
        raise UserError(f"--seconds must be positive, got {seconds}")
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    bps = bytes_per_sample(audio.quantizer)
    n_samples = max(1, int(round(seconds * audio.sample_rate)))
    prompt = prompt_symbols(audio, prompt_wav)
    n_prompt = (len(prompt) - len(zero_symbols(audio.quantizer))) // bps
    device = next(model.parameters()).device
    ids = torch.from_numpy(prompt.astype(np.int64)).to(device)[None].repeat(num_samples, 1)
    model.eval()
    # The progress bar starts after the second step: the prompt, the kernels' first compile and the CUDA-graph
    # capture happen before it, and counted in it they made the rate look 10-40x slower than the decoding is (a
    # 1-second clip: ~9 s of start-up against ~1 s of steps on an H200). Their time is printed on its own line.
    t0 = time.perf_counter()
    bar = None

    def on_step(i, sym):
        nonlocal bar
        if bar is None:
            if i >= 1:
                if progress:
                    what = "prompt, kernel compile, CUDA-graph capture" if device.type == "cuda" else "prompt"
                    print(f"start-up {time.perf_counter() - t0:.1f} s ({what})", file=sys.stderr)
                bar = tqdm(total=n_samples, initial=(i + 1) // bps, unit="sample", unit_scale=True,
                           disable=not progress, mininterval=1.0, desc=f"generating {num_samples} x {seconds:g} s")
        elif (i + 1) % bps == 0:
            bar.update(1)
    try:
        new, logp = generate(model, ids, n_samples * bps, sampling, seed, on_step=on_step,
                             autocast=device.type == "cuda", graphs=graphs)
    finally:
        if bar is not None:
            bar.close()
    new = new.cpu().numpy().astype(np.uint8)
    bits = (-logp.cpu().numpy() / math.log(2.0))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_samples):
        x = dequantize(new[i], audio.quantizer)
        if prompt_wav is not None:                      # the WAV holds the prompt and its continuation
            x = np.concatenate([dequantize(prompt[len(zero_symbols(audio.quantizer)):], audio.quantizer), x])
        name = f"sample_{i:03d}"
        tmp = out / f".{name}.wav.tmp"
        sf.write(str(tmp), x, audio.sample_rate, subtype="PCM_16", format="WAV")
        tmp.replace(out / f"{name}.wav")
        render_png(out / f"{name}.png", x, audio.sample_rate)
        records.append({"wav": f"{name}.wav", "png": f"{name}.png", "index": i,
                        "log_likelihood_bits": -float(bits[i]),
                        "bits_per_sample": float(bits[i]) / n_samples,
                        "seconds": len(x) / audio.sample_rate, "generated_samples": n_samples,
                        "prompt_samples": n_prompt, "rms": rms(x), "spectral_flatness": spectral_flatness(x)})
    records.sort(key=lambda r: r["bits_per_sample"])
    for rank, r in enumerate(records, 1):
        r["rank"] = rank
    summary = {"sample_rate": audio.sample_rate, "quantizer": audio.quantizer, "seed": seed,
               "sampling": vars(sampling), "prompt_wav": str(prompt_wav) if prompt_wav else None,
               "ranked_by": "the model's log-likelihood of the generated samples (best first)",
               "clips": records}
    (out / "samples.json").write_text(json.dumps(summary, indent=2) + "\n")
    return records
