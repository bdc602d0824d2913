"""Audio data: reading every container soundfile offers, mono + resampling, the prepare-once cache,
bad input, clip-aligned and sample-aligned windows, the synth corpus, and real clips when present."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from bytemamba.config import AudioConfig, DataConfig, load_config
from bytemamba.data import build_streams
from bytemamba.data.audio import (AudioReadError, AudioStream, audio_sources, eval_audio, prepare_audio,
                                  read_audio, read_symbols)
from bytemamba.data.quantize import dequantize, quantize
from bytemamba.data.stream import DataError
from bytemamba.data.synth import synth_corpus

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO.parent / "shared" / "data" / "audio" / "digits_synth"
SR = 16000


def tone(freq=440.0, seconds=0.5, sr=SR, amp=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


def make_clips(folder: Path, n=6, seconds=0.1, sr=SR, fmt="wav"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sf.write(folder / f"clip{i:02d}.{fmt}", tone(200 + 50 * i, seconds, sr), sr)
    return folder


def acfg(tmp_path, **kw):
    return AudioConfig(cache_dir=str(tmp_path / "cache"), **kw)


# ---- reading --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,subtype,sr", [("WAV", "PCM_16", 44100), ("FLAC", "PCM_16", 22050),
                                            ("OGG", "VORBIS", 44100), ("OGG", "OPUS", 48000),
                                            ("MP3", "MPEG_LAYER_III", 44100)])
def test_read_formats_mixdown_resample(tmp_path, fmt, subtype, sr):
    if subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"this libsndfile cannot write {fmt}/{subtype}")
    stereo = np.stack([tone(440, 0.5, sr), tone(440, 0.5, sr) * 0.5], axis=1)
    ext = {"WAV": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3"}[fmt]
    f = tmp_path / f"a.{ext}"
    sf.write(f, stereo, sr, format=fmt, subtype=subtype)
    x, meta = read_audio(f, SR)
    assert meta["original_rate"] == sr and meta["channels"] == 2
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - SR * 0.5) < 0.05 * SR                 # codecs may pad a little
    assert abs(peak_hz(x, SR) - 440) < 5                      # the tone survived decode + resample
    mid = x[len(x) // 4: 3 * len(x) // 4]
    assert abs(np.sqrt(np.mean(mid ** 2)) - 0.375 / np.sqrt(2)) < 0.03  # mean of the channels


def test_mixdown_and_resample_are_exact_where_defined(tmp_path):
    import torchaudio.functional as AF

    left, right = tone(300, 0.25, 44100), tone(700, 0.25, 44100, 0.25)
    f = tmp_path / "s.wav"
    sf.write(f, np.stack([left, right], 1), 44100, subtype="FLOAT")
    x, _ = read_audio(f, 44100)
    np.testing.assert_allclose(x, (left + right) / 2, atol=1e-7)
    y, _ = read_audio(f, SR)
    want = AF.resample(torch.from_numpy((left + right) / 2), 44100, SR).numpy()
    np.testing.assert_allclose(y, np.clip(want, -1, 1), atol=1e-6)


def test_bad_files_raise_named_errors(tmp_path):
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF" + bytes(range(200)))
    notes = tmp_path / "notes.csv"
    notes.write_text("a,b\n1,2\n")
    nan = tmp_path / "nan.wav"
    x = tone()
    x[100] = np.nan
    sf.write(nan, x, SR, subtype="FLOAT")
    inf = tmp_path / "inf.wav"
    x = tone()
    x[5] = np.inf
    sf.write(inf, x, SR, subtype="FLOAT")
    multi = tmp_path / "six.wav"
    sf.write(multi, np.zeros((800, 6), dtype=np.float32), SR)
    slow = tmp_path / "rate.wav"
    sf.write(slow, tone(10, 1.0, 100), 100)
    cases = {empty: "empty file", junk: "not a readable audio file", notes: "not a readable audio file",
             nan: "NaN or infinite", inf: "NaN or infinite", multi: "6 channels", slow: "absurd sample rate 100"}
    for f, msg in cases.items():
        with pytest.raises(AudioReadError, match=msg) as e:
            read_audio(f, SR)
        assert str(f) in str(e.value)


# ---- prepare, cache, bad input ------------------------------------------------------------------

def test_prepare_writes_stream_index_manifest_and_reuses(tmp_path):
    folder = make_clips(tmp_path / "clips", n=6, seconds=0.1)
    data, audio = DataConfig(kind="audio", path=str(folder), val_fraction=0.2), acfg(tmp_path)
    p = prepare_audio(data, audio)
    assert not p.reused and (p.dir / "done").exists()
    m = json.loads((p.dir / "manifest.json").read_text())
    assert m["quantizer"] == "mulaw8" and m["sample_rate"] == SR and m["files"] == 6 and m["skipped"] == []
    assert len(m["clips"]) == 6 and {c["split"] for c in m["clips"]} == {"train", "val"}
    clip = m["clips"][0]
    assert clip["original_rate"] == SR and abs(clip["duration"] - 0.1) < 1e-9 and clip["source"].endswith(".wav")
    # every clip: the quantized zero, then its samples; starts recorded as clip boundaries
    assert len(p.train) + len(p.val) == 6 * (1600 + 1)
    assert list(p.train.doc_starts) == list(range(0, len(p.train), 1601))
    first = next(c for c in m["clips"] if c["split"] == "train" and c["offset"] == 0)
    want = quantize(read_audio(folder / first["source"], SR)[0], "mulaw8")
    assert p.train.data[0] == 128 and np.array_equal(np.asarray(p.train.data[1:1601]), want)
    mtime = (p.dir / "train.bin").stat().st_mtime_ns
    # second run: the same directory, nothing rewritten
    q = prepare_audio(data, audio)
    assert q.reused and q.dir == p.dir and (q.dir / "train.bin").stat().st_mtime_ns == mtime
    # other settings, or a changed source, make a new cache
    assert prepare_audio(data, acfg(tmp_path, quantizer="pcm16")).dir != p.dir
    sf.write(folder / "clip00.wav", tone(999, 0.1), SR)
    assert prepare_audio(data, audio).dir != p.dir


def test_bad_files_are_skipped_named_and_counted(tmp_path, capsys):
    folder = make_clips(tmp_path / "mixed", n=3, seconds=0.1)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "corrupt.flac").write_bytes(b"fLaC" + b"\x00" * 100)
    (folder / "readme.md").write_text("# not audio\n")
    x = tone()
    x[3] = np.nan
    sf.write(folder / "nan.wav", x, SR, subtype="FLOAT")
    sf.write(folder / "three.wav", np.zeros((100, 3), dtype=np.float32), SR)
    p = prepare_audio(DataConfig(kind="audio", path=str(folder), val_fraction=0.0), acfg(tmp_path))
    err = capsys.readouterr().err
    for name in ("empty.wav", "corrupt.flac", "readme.md", "nan.wav", "three.wav"):
        assert f"{folder / name}" in err, name
    assert "skipped 5 of 8 file(s)" in err
    m = json.loads((p.dir / "manifest.json").read_text())
    assert len(m["skipped"]) == 5 and len(m["clips"]) == 3 and len(p.train) == 3 * 1601
    # reuse reports that files were skipped when the cache was built
    prepare_audio(DataConfig(kind="audio", path=str(folder), val_fraction=0.0), acfg(tmp_path))
    assert "5 file(s) were skipped" in capsys.readouterr().err


def test_nothing_usable_is_an_error_and_leaves_no_cache(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.wav").write_bytes(b"")
    (folder / "b.txt").write_text("hello")
    with pytest.raises(DataError, match="no usable training audio: 2 of 2 file"):
        prepare_audio(DataConfig(kind="audio", path=str(folder)), acfg(tmp_path))
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_interrupted_prepare_leaves_nothing_half_written(tmp_path, monkeypatch):
    import bytemamba.data.audio as A

    folder = make_clips(tmp_path / "clips", n=4)
    calls = {"n": 0}
    real = A.encode_clip

    def failing(x, audio):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(x, audio)

    monkeypatch.setattr(A, "encode_clip", failing)
    data = DataConfig(kind="audio", path=str(folder))
    with pytest.raises(KeyboardInterrupt):
        prepare_audio(data, acfg(tmp_path))
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(A, "encode_clip", real)
    p = prepare_audio(data, acfg(tmp_path))
    assert not p.reused and len(p.train) + len(p.val) == 4 * 1601


def test_list_file_val_path_and_missing_entries(tmp_path, capsys):
    train = make_clips(tmp_path / "train", n=3)
    valid = make_clips(tmp_path / "valid", n=2, fmt="flac")
    lst = tmp_path / "files.txt"
    lst.write_text("# my clips\ntrain/clip00.wav\ntrain/clip02.wav\n\ntrain/missing.wav\n")
    root, files = audio_sources(lst)
    assert root == tmp_path and [f.name for f in files] == ["clip00.wav", "clip02.wav", "missing.wav"]
    p = prepare_audio(DataConfig(kind="audio", path=str(lst)), acfg(tmp_path, val_path=str(valid)))
    assert "missing.wav: file not found" in capsys.readouterr().err
    assert len(p.train) == 2 * 1601 and len(p.val) == 2 * 1601
    m = json.loads((p.dir / "manifest.json").read_text())
    assert sorted(c["source"] for c in m["clips"] if c["split"] == "val") == ["clip00.flac", "clip01.flac"]
    with pytest.raises(DataError, match="audio path not found"):
        prepare_audio(DataConfig(kind="audio", path=str(tmp_path / "nope")), acfg(tmp_path))


def test_single_long_file_splits_by_time(tmp_path):
    f = tmp_path / "long.flac"
    sf.write(f, tone(330, 2.0), SR)
    p = prepare_audio(DataConfig(kind="audio", path=str(f), val_fraction=0.25), acfg(tmp_path))
    assert len(p.train) == 24000 + 1 and len(p.val) == 8000 + 1


# ---- windows -------------------------------------------------------------------------------------

def test_clip_windows_start_at_clips_and_never_cross(tmp_path):
    folder = make_clips(tmp_path / "c", n=8, seconds=0.1)
    p = prepare_audio(DataConfig(kind="audio", path=str(folder), val_fraction=0.0),
                      acfg(tmp_path, window="clip"))
    s = p.train
    assert isinstance(s, AudioStream) and s.clip_windows
    rng = np.random.default_rng(1)
    starts = s.window_starts(rng, 200, 1600)                  # a window = the zero + the whole clip
    assert set(starts.tolist()) <= set(s.doc_starts.tolist())
    assert len(set(starts.tolist())) == 8
    ids, reset = s.windows(starts, 1600)
    assert np.all(ids[:, 0] == 128) and reset[:, 0].all() and not reset[:, 1:].any()
    # shorter windows stay inside one clip
    starts = s.window_starts(rng, 500, 255)
    clip_of = np.searchsorted(s.doc_starts, starts, side="right") - 1
    assert np.all(starts + 256 <= s.doc_starts[clip_of] + 1601)


def test_clip_start_fraction_opens_that_share_of_training_windows_on_a_clip(tmp_path):
    folder = make_clips(tmp_path / "c", n=8, seconds=0.1)
    data = DataConfig(kind="audio", path=str(folder), val_fraction=0.25)
    plain = prepare_audio(data, acfg(tmp_path)).train
    p = prepare_audio(data, acfg(tmp_path, clip_start_fraction=0.3))
    s = p.train
    assert p.reused and s.clip_start_fraction == 0.3 and p.val.clip_start_fraction == 0.0   # same cache
    starts = s.window_starts(np.random.default_rng(0), 4000, 255)
    at_clip = np.isin(starts, s.doc_starts)
    assert 0.27 < at_clip.mean() < 0.36           # 0.3, plus the odd random start that falls on a clip
    assert set(starts[at_clip].tolist()) == set(s.doc_starts.tolist())
    ids, reset = s.windows(starts[at_clip][:20], 255)
    assert np.all(ids[:, 0] == 128) and reset[:, 0].all()      # the quantized zero, a reset
    assert starts.max() + 256 <= len(s)
    assert np.isin(plain.window_starts(np.random.default_rng(0), 4000, 255), s.doc_starts).mean() < 0.05
    with pytest.raises(ValueError, match="clip_start_fraction"):
        load_config(REPO / "recipes" / "audio_default.toml", ["audio.clip_start_fraction=1.5"])


def test_random_windows_are_sample_aligned_and_mark_resets(tmp_path):
    folder = make_clips(tmp_path / "c", n=4, seconds=0.05)
    p = prepare_audio(DataConfig(kind="audio", path=str(folder), val_fraction=0.0),
                      acfg(tmp_path, quantizer="pcm16"))
    s = p.train
    starts = s.window_starts(np.random.default_rng(0), 300, 1000)
    assert np.all(starts % 2 == 0) and starts.max() + 1001 <= len(s)
    ids, reset = s.windows(starts, 1000)
    for st, r in zip(starts, reset):
        want = [b - st for b in s.doc_starts if st <= b < st + 1000]
        assert np.flatnonzero(r).tolist() == want
    # the stream decodes back to the clips (high byte, low byte per sample)
    x = dequantize(np.asarray(s.data[2:1602]), "pcm16")
    np.testing.assert_allclose(x, read_audio(folder / "clip00.wav", SR)[0], atol=1 / 32768)


def test_pcm16_recipe_needs_even_windows():
    from bytemamba.config import ConfigError
    with pytest.raises(ConfigError, match="train.seq_len must be even"):
        load_config(REPO / "recipes" / "audio_pcm16.toml", ["train.seq_len=511"])


# ---- synth, build_streams, recipes ----------------------------------------------------------------

def test_synth_is_deterministic_music(tmp_path):
    a, b = synth_corpus(12, seed=3), synth_corpus(12, seed=3)
    assert len(a) == len(b) >= 3 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(np.concatenate(a)[:16000], np.concatenate(synth_corpus(12, seed=4))[:16000])
    x = np.concatenate(a)
    assert abs(len(x) / SR - 12) < 0.01 and np.max(np.abs(x)) <= 0.9 + 1e-6
    assert np.mean(x == 0) > 0.002                            # rests ...
    for c in a:                                               # ... short ones, and none to open a phrase
        z = np.flatnonzero(np.diff(np.r_[0, (c == 0).astype(np.int8), 0]))
        assert (z[1::2] - z[::2]).max() < 0.4 * SR and np.max(np.abs(c[:200])) > 0
    from bytemamba.generate_audio import spectral_flatness
    assert spectral_flatness(x) < 0.1                         # tonal, not noise
    train, val = build_streams(DataConfig(kind="audio", val_fraction=0.2),
                               acfg(tmp_path, synth_seconds=12, synth_seed=3))
    assert len(train) + len(val) == len(x) + len(a) and len(val) > 0


def test_every_recipe_loads():
    recipes = sorted((REPO / "recipes").glob("*.toml"))
    assert any(r.name == "audio_default.toml" for r in recipes)
    for r in recipes:
        cfg = load_config(r)
        if r.name.startswith("audio_"):
            assert cfg.data.kind == "audio"
    assert load_config(REPO / "recipes" / "audio_sc09.toml", ["data.path=/x"]).data.path == "/x"


def test_eval_reading_skips_bad_files(tmp_path, capsys):
    from bytemamba.config import ModelConfig
    from bytemamba.models.lm import ByteMambaLM

    folder = make_clips(tmp_path / "ev", n=2, seconds=0.05)
    (folder / "broken.wav").write_bytes(b"nope")
    torch.manual_seed(0)
    model = ByteMambaLM(ModelConfig(d_model=16, n_layer=1, d_state=4)).eval()
    res = eval_audio(model, AudioConfig(quantizer="pcm16"), folder, window=300)
    assert "broken.wav" in capsys.readouterr().err
    assert res["symbols"] == 2 * (2 * 801 - 1) and res["bits_per_sample"] == 2 * res["bits_per_byte"]
    assert 4 < res["bits_per_byte"] < 12                      # an untrained model: about 8
    assert len(read_symbols(folder / "clip00.wav", AudioConfig())) == 801


@pytest.mark.skipif(not DIGITS.is_dir(), reason=f"real audio not available at {DIGITS}")
def test_real_digit_clips_prepare_as_clip_windows(tmp_path):
    files = sorted((DIGITS / "train").glob("*.flac"))[:12]
    lst = tmp_path / "digits.txt"
    lst.write_text("\n".join(str(f) for f in files) + "\n")
    p = prepare_audio(DataConfig(kind="audio", path=str(lst), val_fraction=0.0),
                      acfg(tmp_path, window="clip", val_path=str(files[-1])))
    m = json.loads((p.dir / "manifest.json").read_text())
    assert all(c["duration"] == 1.0 and c["original_rate"] == SR for c in m["clips"])
    assert len(p.train) == 12 * 16001
    starts = p.train.window_starts(np.random.default_rng(0), 50, 16000)
    assert set(starts.tolist()) <= set(range(0, 12 * 16001, 16001))
    codes = np.asarray(p.train.data)
    # speech padded with digital silence: the central codes dominate (the data README says ~59%)
    assert 0.3 < np.mean((codes >= 127) & (codes <= 129)) < 0.9


def test_validation_file_is_chosen_among_audio_files(tmp_path, capsys):
    folder = make_clips(tmp_path / "pieces", n=3, seconds=0.05)
    (folder / "metadata.csv").write_text("name,seconds\n")
    p = prepare_audio(DataConfig(kind="audio", path=str(folder), val_fraction=0.001), acfg(tmp_path))
    m = json.loads((p.dir / "manifest.json").read_text())
    val = [c["source"] for c in m["clips"] if c["split"] == "val"]
    assert len(val) == 1 and val[0].endswith(".wav") and len(p.val) == 801
    assert "metadata.csv" in capsys.readouterr().err and m["skipped"][0]["source"] == "metadata.csv"


def test_folder_pattern_filters_files(tmp_path, capsys):
    folder = make_clips(tmp_path / "f", n=2, seconds=0.05)
    make_clips(folder, n=3, seconds=0.05, fmt="flac")
    (folder / "notes.md").write_text("x")
    p = prepare_audio(DataConfig(kind="audio", path=str(folder), val_fraction=0.0, pattern="*.flac"),
                      acfg(tmp_path))
    assert len(p.train) == 3 * 801 and "notes.md" not in capsys.readouterr().err
    with pytest.raises(DataError, match="no files matching"):
        prepare_audio(DataConfig(kind="audio", path=str(folder), pattern="*.mp3"), acfg(tmp_path))
