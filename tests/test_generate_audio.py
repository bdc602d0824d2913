"""Audio generation: WAV + PNG + ranked JSON, prompts, the CLI; and (slow) a short real training run on
the synth corpus whose samples must be neither silence nor white noise."""

import json
import struct
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from bytemamba.cli import main
from bytemamba.config import AudioConfig, ModelConfig, load_config
from bytemamba.data.quantize import quantize
from bytemamba.errors import UserError
from bytemamba.generate import Sampling
from bytemamba.generate_audio import (generate_audio, render_png, rms, spectral_flatness, write_png)
from bytemamba.models.io import save_model
from bytemamba.models.lm import ByteMambaLM

REPO = Path(__file__).resolve().parents[1]


def read_png(path):
    """A minimal reader for the 8-bit RGB, filter-0 PNGs that write_png makes."""
    b = Path(path).read_bytes()
    assert b[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(b):
        n, = struct.unpack(">I", b[pos:pos + 4])
        tag, body = b[pos + 4:pos + 8], b[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", b[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + body)
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h, depth, ctype = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and ctype == 2
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[y * (3 * w + 1):(y + 1) * (3 * w + 1)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    return np.frombuffer(b"".join(r[1:] for r in rows), dtype=np.uint8).reshape(h, w, 3)


def tiny_audio_model(tmp_path, quantizer="mulaw8", name="m"):
    torch.manual_seed(0)
    model = ByteMambaLM(ModelConfig(d_model=16, n_layer=1, d_state=4)).eval()
    extra = {"data": {"kind": "audio", "path": ""}, "audio": asdict(AudioConfig(quantizer=quantizer))}
    save_model(model, tmp_path / name, extra)
    return model, json.loads((tmp_path / name / "config.json").read_text())


def test_png_writer_round_trip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", img)
    assert np.array_equal(read_png(tmp_path / "a.png"), img)
    x = np.sin(np.arange(8000) * 0.1).astype(np.float32) * 0.5
    render_png(tmp_path / "b.png", x, 16000, width=300, wave_h=80, spec_h=100)
    pic = read_png(tmp_path / "b.png")
    assert pic.shape == (182, 300, 3)
    wave, spec = pic[:80], pic[82:]
    assert (wave == (31, 90, 160)).all(-1).sum() > 300          # the waveform is drawn
    row_energy = spec.astype(int).sum(axis=(1, 2))
    # a 255 Hz tone: the brightest spectrogram row sits near the bottom (low frequency)
    assert np.argmax(row_energy) > 90


def test_measures_tell_tones_from_noise():
    rng = np.random.default_rng(0)
    noise = rng.uniform(-0.5, 0.5, 16000)
    sine = 0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    assert spectral_flatness(noise) > 0.8 and spectral_flatness(sine) < 0.01
    assert abs(rms(sine) - 0.5 / np.sqrt(2)) < 1e-3 and rms(np.zeros(5)) == 0


def test_generate_writes_ranked_clips(tmp_path):
    model, meta = tiny_audio_model(tmp_path)
    recs = generate_audio(model, meta, 0.02, 3, tmp_path / "out", sampling=Sampling(1.0), seed=1,
                          progress=False)
    assert [r["rank"] for r in recs] == [1, 2, 3]
    bits = [r["bits_per_sample"] for r in recs]
    assert bits == sorted(bits) and all(b > 0 for b in bits)
    summary = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert summary["sample_rate"] == 16000 and [c["wav"] for c in summary["clips"]] == [r["wav"] for r in recs]
    for r in recs:
        x, sr = sf.read(tmp_path / "out" / r["wav"])
        assert sr == 16000 and len(x) == 320
        assert read_png(tmp_path / "out" / r["png"]).shape[1] == 800
        assert r["log_likelihood_bits"] == pytest.approx(-r["bits_per_sample"] * 320)
    # the same seed gives the same clips
    again = generate_audio(model, meta, 0.02, 3, tmp_path / "out2", sampling=Sampling(1.0), seed=1,
                           progress=False)
    for a, b in zip(recs, again):
        assert np.array_equal(sf.read(tmp_path / "out" / a["wav"])[0], sf.read(tmp_path / "out2" / b["wav"])[0])


def test_prompt_continuation_and_pcm16(tmp_path):
    model, meta = tiny_audio_model(tmp_path, "pcm16")
    prompt = (0.3 * np.sin(np.arange(800) * 0.2)).astype(np.float32)
    sf.write(tmp_path / "p.wav", prompt, 8000)                 # another rate: resampled to 16 kHz
    recs = generate_audio(model, meta, 0.01, 2, tmp_path / "o", prompt_wav=tmp_path / "p.wav",
                          sampling=Sampling(1.0), progress=False)
    x, sr = sf.read(tmp_path / "o" / recs[0]["wav"], dtype="int16")
    assert sr == 16000 and len(x) == 1600 + 160 and recs[0]["prompt_samples"] == 1600
    from bytemamba.data.audio import read_audio
    want = quantize(read_audio(tmp_path / "p.wav", 16000)[0], "pcm16")
    from bytemamba.data.quantize import pcm16_decode_int
    assert np.array_equal(x[:1600], pcm16_decode_int(want))   # the prompt, bit for bit
    with pytest.raises(UserError, match="--prompt-wav"):
        generate_audio(model, meta, 0.01, 1, tmp_path / "o", prompt_wav=tmp_path / "missing.wav")


def test_cli_audio_generate_and_refusals(tmp_path, capsys):
    tiny_audio_model(tmp_path)
    out = tmp_path / "gen"
    assert main(["generate", str(tmp_path / "m"), "--audio", "--seconds", "0.01", "--num-samples", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sample_000.png", "sample_000.wav", "sample_001.png",
                                                    "sample_001.wav", "samples.json"]
    assert main(["generate", str(tmp_path / "m"), "--audio", "--device", "cpu"]) == 2
    assert "needs --out" in capsys.readouterr().err
    torch.manual_seed(0)
    save_model(ByteMambaLM(ModelConfig(d_model=16, n_layer=1, d_state=4)), tmp_path / "t",
               {"data": {"kind": "text"}})
    assert main(["generate", str(tmp_path / "t"), "--audio", "--out", str(out), "--device", "cpu"]) == 2
    assert "text model" in capsys.readouterr().err


@pytest.mark.slow
def test_train_synth_then_generate_music_not_noise(tmp_path, capsys):
    """A short real training run of the default audio recipe (scaled down) on CPU: validation falls far
    below 8 bits per sample, eval agrees, and generated clips are neither silence nor white noise."""
    from bytemamba.data.synth import synth_corpus
    from bytemamba.train import train

    out = tmp_path / "run"
    cfg = load_config(REPO / "recipes" / "audio_default.toml", [
        f"train.out_dir={out}", f"audio.cache_dir={tmp_path / 'cache'}", "audio.synth_seconds=30",
        "data.val_fraction=0.15", "train.max_steps=160", "train.seq_len=64",
        "train.eval_every=160", "train.eval_batches=4", "train.save_every=160", "train.trackers=none",
        "train.device=cpu", "train.log_every=20"])
    result = train(cfg)
    assert result["val_bits_per_symbol"] < 6.0, result
    assert "bits per sample" in capsys.readouterr().out
    # streaming eval over a held-out synth file agrees that the model is far below 8 bits
    clips = synth_corpus(30, 0)
    sf.write(tmp_path / "held.wav", clips[-1][:8000], 16000)
    assert main(["eval", str(out / "model"), "--data", str(tmp_path / "held.wav"), "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(line.split()[0]) < 6.0 and "bits per sample" in line
    # generation: 2 clips in one batch
    gen = tmp_path / "gen"
    assert main(["generate", str(out / "model"), "--audio", "--seconds", "0.125", "--num-samples", "2",
                 "--out", str(gen), "--temperature", "1.0", "--device", "cpu"]) == 0
    # the training audio's range, measured on 0.125 s pieces that are not mostly silence
    train_x = np.concatenate(clips)
    pieces = [train_x[i:i + 2000] for i in range(0, len(train_x) - 2000, 2000)]
    pieces = [p for p in pieces if np.mean(np.abs(p) < 1e-3) < 0.5]
    t_rms = [rms(p) for p in pieces]
    t_flat = [spectral_flatness(p) for p in pieces]
    noise = np.random.default_rng(0).uniform(-1, 1, 2000) * max(t_rms) * np.sqrt(3)
    for r in json.loads((gen / "samples.json").read_text())["clips"]:
        x, sr = sf.read(gen / r["wav"])
        assert sr == 16000 and len(x) == 2000
        assert 0.25 * min(t_rms) <= rms(x) <= 2.0 * max(t_rms), (rms(x), min(t_rms), max(t_rms))
        flat = spectral_flatness(x)
        assert flat < 0.5 * spectral_flatness(noise), (flat, spectral_flatness(noise), max(t_flat))


def test_pcm16_train_and_eval_report_bytes_and_samples(tmp_path, capsys):
    """A few real steps of the pcm16 recipe: figures are reported per byte and per sample (2x)."""
    from bytemamba.train import train

    out = tmp_path / "run"
    cfg = load_config(REPO / "recipes" / "audio_pcm16.toml", [
        f"train.out_dir={out}", f"audio.cache_dir={tmp_path / 'cache'}", "audio.synth_seconds=8",
        "data.val_fraction=0.3", "model.d_model=16", "model.n_layer=1", "train.max_steps=4",
        "train.batch_size=4", "train.seq_len=64", "train.eval_every=4", "train.eval_batches=2",
        "train.save_every=4", "train.trackers=none", "train.device=cpu", "optim.warmup_steps=2"])
    result = train(cfg)
    bpb = result["val_bits_per_symbol"]
    assert 0 < bpb < 9
    assert f"{bpb:.4f} bits per byte ({2 * bpb:.4f} bits per sample)" in capsys.readouterr().out
    meta = json.loads((out / "model" / "config.json").read_text())
    assert meta["audio"]["quantizer"] == "pcm16" and meta["data"]["kind"] == "audio"
    sf.write(tmp_path / "x.flac", (0.3 * np.sin(np.arange(1600) * 0.05)).astype(np.float32), 16000)
    assert main(["eval", str(out / "model"), "--data", str(tmp_path / "x.flac"), "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    per_byte, per_sample = float(line.split()[0]), float(line.split()[4])
    assert "bits per byte" in line and "over 1,600 samples" in line and per_sample == pytest.approx(2 * per_byte, abs=2e-4)
