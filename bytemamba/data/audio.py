"""Raw audio as symbol streams: read -> mono -> resample -> (normalise) -> quantize -> uint8 memmap.

Reading goes through `soundfile` (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF ...): channels are averaged to
mono and the result is resampled with `torchaudio.functional.resample` to the recipe's rate.

Prepare once. `prepare_audio` turns a folder (every file under it, recursively), a list file (`.txt`,
`.lst` or `.list`: one path per line, relative to the list's folder; `#` starts a comment) or one file
into a cache directory keyed by the sources (names, sizes, mtimes) and the settings (rate, quantizer,
normalisation, split):

    train.bin / val.bin          uint8 symbols; each clip is the quantized zero then its samples
    train.idx.npy / val.idx.npy  int64 offsets where clips begin (they become `reset` flags)
    manifest.json                per clip: source, split, original rate, channels, duration, offset;
                                 the settings; the files skipped and why

It is written under a temporary name and renamed when complete, so an interrupted or failed prepare
leaves nothing that looks whole; a later run with the same sources and settings reuses it.

Each clip starts with the quantized zero (one silent sample), as in SaShiMi's training: a window that
begins at a clip start predicts the clip's first sample from silence, and unconditional generation starts
from that same symbol.

Validation: `audio.val_path` (a folder, list or file, e.g. digits_synth/valid) when set; otherwise a
held-out set of files chosen by a hash of their relative path (`data.val_fraction`, at least one file
when there are two or more), or the last `val_fraction` of the samples of a single file.

Bad input: a file that cannot be read, is empty, is not audio, holds NaN or infinite samples, has more
than two channels or an absurd sample rate is skipped with a warning naming it, a count of skipped files
follows, and only when nothing usable remains is it an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bytemamba.config import AudioConfig, DataConfig
from bytemamba.data.quantize import bytes_per_sample, quantize, zero_symbols
from bytemamba.data.stream import DataError, SymbolStream

CACHE_VERSION = 1
LIST_SUFFIXES = {".txt", ".lst", ".list"}
# extensions of the containers soundfile decodes; only these are candidates for the validation split
# (every file is still tried: a non-audio file is skipped with a warning)
AUDIO_SUFFIXES = {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
                  ".au", ".snd", ".caf", ".w64", ".rf64", ".sd2", ".voc", ".mat", ".htk", ".sph", ".nist"}
MIN_RATE, MAX_RATE = 1000, 768_000


class AudioReadError(DataError):
    """One audio file that cannot be used (the message says which and why)."""


def _quiet() -> bool:
    return int(os.environ.get("RANK", "0") or 0) != 0


def warn(msg: str) -> None:
    if not _quiet():
        print(f"bytemamba: warning: {msg}", file=sys.stderr, flush=True)


def info(msg: str) -> None:
    if not _quiet():
        print(msg, file=sys.stderr, flush=True)


# ---- reading --------------------------------------------------------------------------------------

def read_audio(path, sample_rate: int | None = None) -> tuple[np.ndarray, dict]:
    """Decode a file to float32 mono in [-1, 1] at `sample_rate` (None: the file's own rate).

    Returns (samples, {"original_rate", "channels", "frames", "duration"}). Raises AudioReadError.
    """
    import soundfile as sf

    p = Path(path)
    if not p.is_file():
        raise AudioReadError(f"{p}: file not found")
    if p.stat().st_size == 0:
        raise AudioReadError(f"{p}: empty file")
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError, EOFError) as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise AudioReadError(f"{p}: not a readable audio file ({msg})") from None
    if not MIN_RATE <= sr <= MAX_RATE:
        raise AudioReadError(f"{p}: absurd sample rate {sr} Hz (accepted: {MIN_RATE}..{MAX_RATE})")
    channels = data.shape[1]
    if channels > 2:
        raise AudioReadError(f"{p}: {channels} channels (mono or stereo only)")
    if data.shape[0] == 0:
        raise AudioReadError(f"{p}: no samples")
    if not np.isfinite(data).all():
        raise AudioReadError(f"{p}: NaN or infinite samples")
    x = data.mean(axis=1, dtype=np.float32) if channels > 1 else data[:, 0]
    meta = {"original_rate": int(sr), "channels": int(channels), "frames": int(data.shape[0]),
            "duration": data.shape[0] / sr}
    if sample_rate is not None and sr != sample_rate:
        x = resample(x, sr, sample_rate)
    return np.clip(x, -1.0, 1.0).astype(np.float32, copy=False), meta


def resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    import torch
    import torchaudio.functional as AF

    if orig == new:
        return x
    return AF.resample(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), orig, new).numpy()


def encode_clip(x: np.ndarray, audio: AudioConfig) -> np.ndarray:
    """One clip's symbols as they sit in a prepared stream: the quantized zero, then the samples."""
    return np.concatenate([zero_symbols(audio.quantizer), quantize(x, audio.quantizer, audio.normalize)])


def read_symbols(path, audio: AudioConfig) -> np.ndarray:
    """A file as the symbols a model of `audio` settings reads (evaluation, prompts)."""
    x, _ = read_audio(path, audio.sample_rate)
    return encode_clip(x, audio)


def audio_sources(path, pattern: str = "*") -> tuple[Path, list[Path]]:
    """(root, files) of a folder (non-hidden files matching `pattern`, recursively), a list file, or one file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"audio path not found: {p}")
    if p.is_dir():
        files = sorted(f for f in p.rglob(pattern or "*")
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise DataError(f"audio folder {p} holds no files matching {pattern!r}")
        return p, files
    if p.suffix.lower() in LIST_SUFFIXES:
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError) as e:
            raise DataError(f"list file {p} is not readable text: {e}") from None
        files = []
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if line:
                q = Path(line).expanduser()
                files.append(q if q.is_absolute() else p.parent / q)
        if not files:
            raise DataError(f"list file {p} names no files")
        return p.parent, files
    return p.parent, [p]


def _rel(root: Path, f: Path) -> str:
    try:
        return str(f.relative_to(root))
    except ValueError:
        return str(f)


def _listing(root: Path, files: list[Path]) -> list:
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append([_rel(root, f), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([_rel(root, f), -1, -1])
    return out


def _is_val(rel: str, val_fraction: float) -> bool:
    return (zlib.crc32(rel.encode("utf-8", "surrogateescape")) % 10_000) < val_fraction * 10_000


def split_files(rels: list[str], val_fraction: float) -> list[bool]:
    """Per file: held out for validation? A hash of the relative path, so the split does not move when
    files are added; at least one file is held out when there are two or more and val_fraction > 0."""
    flags = [_is_val(r, val_fraction) for r in rels]
    if val_fraction > 0 and len(rels) >= 2 and not any(flags):
        flags[min(range(len(rels)), key=lambda i: zlib.crc32(rels[i].encode("utf-8", "surrogateescape")))] = True
    if all(flags) and flags:
        flags[0] = False
    return flags


# ---- streams --------------------------------------------------------------------------------------

@dataclass
class AudioStream(SymbolStream):
    """A prepared audio stream: windows start on sample boundaries; with `clip_windows`, at clip starts."""

    bytes_per_sample: int = 1
    clip_windows: bool = False
    sample_rate: int = 16000
    clip_start_fraction: float = 0.0     # share of windows that begin exactly at a clip start

    def window_starts(self, rng: np.random.Generator, count: int, seq_len: int) -> np.ndarray:
        starts = self._window_starts(rng, count, seq_len)
        if self.clip_start_fraction > 0:
            # Some windows open on a clip (its quantized zero, then the phrase's onset from silence): a
            # random window of 512 samples holds a clip start only ~2% of the time on the synth corpus,
            # and unconditional generation begins exactly there. Extra draws only when enabled, so the
            # default batches do not move.
            firsts = self.doc_starts[self.doc_starts + seq_len + 1 <= len(self)]
            at = rng.random(count) < self.clip_start_fraction
            if len(firsts):
                starts = np.where(at, firsts[rng.integers(0, len(firsts), size=count)], starts)
        return starts

    def _window_starts(self, rng: np.random.Generator, count: int, seq_len: int) -> np.ndarray:
        need = seq_len + 1
        bps = self.bytes_per_sample
        if self.clip_windows:
            starts = self.doc_starts
            ends = np.append(starts[1:], len(self))
            ok = starts + need <= len(self)
            if not ok.any():
                raise DataError(f"{self.name}: {len(self)} symbols, fewer than one window of {need}")
            starts, ends = starts[ok], ends[ok]
            pick = rng.integers(0, len(starts), size=count)
            room = ends[pick] - starts[pick] - need          # < 0: the clip is shorter than the window
            slots = np.where(room >= 0, room // bps + 1, 1)
            off = (rng.random(count) * slots).astype(np.int64) * bps
            return starts[pick] + off
        hi = len(self) - need
        if hi < 0:
            raise DataError(f"{self.name}: {len(self)} symbols, fewer than one window of {need}")
        return rng.integers(0, hi // bps + 1, size=count) * bps


@dataclass
class Prepared:
    dir: Path
    train: AudioStream
    val: AudioStream
    manifest: dict = field(default_factory=dict)
    reused: bool = False


def cache_root(audio: AudioConfig) -> Path:
    if audio.cache_dir:
        return Path(audio.cache_dir).expanduser()
    base = Path(os.environ.get("BYTEMAMBA_CACHE", Path.home() / ".cache" / "bytemamba"))
    return base / "audio"


def _settings(audio: AudioConfig) -> dict:
    return {"sample_rate": audio.sample_rate, "quantizer": audio.quantizer, "normalize": audio.normalize}


class _Writer:
    """Appends clips to <split>.bin and records their starts."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.starts: list[int] = []
        self.pos = 0

    def add(self, symbols: np.ndarray) -> int:
        self.starts.append(self.pos)
        self.f.write(symbols.tobytes())
        self.pos += len(symbols)
        return self.starts[-1]

    def close(self, idx_path: Path) -> None:
        self.f.close()
        np.save(idx_path, np.asarray(self.starts, dtype=np.int64))


def _load(cdir: Path, split: str, audio: AudioConfig, label: str) -> AudioStream:
    binf = cdir / f"{split}.bin"
    starts = np.load(cdir / f"{split}.idx.npy")
    size = binf.stat().st_size
    data = np.memmap(binf, dtype=np.uint8, mode="r") if size else np.zeros(0, dtype=np.uint8)
    if not len(starts):
        starts = np.zeros(1, dtype=np.int64)
    return AudioStream(data, starts, f"{label}:{split}", bytes_per_sample=bytes_per_sample(audio.quantizer),
                       clip_windows=audio.window == "clip", sample_rate=audio.sample_rate,
                       clip_start_fraction=audio.clip_start_fraction if split == "train" else 0.0)


def _build(cdir: Path, key: str, fill, manifest: dict) -> None:
    """Run `fill(tmp_dir, manifest)` in a temporary directory and rename it onto `cdir` when complete."""
    cdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cdir.parent))
    try:
        fill(tmp, manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        (tmp / "done").write_text("ok\n")
        try:
            tmp.rename(cdir)
        except OSError:                         # another process finished first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fill_files(train_files, val_files, audio: AudioConfig, tail_fraction: float, label: str):
    """The fill function of a prepare from files (tail_fraction > 0: one file, split by time)."""

    def fill(tmp: Path, manifest: dict) -> None:
        from tqdm.auto import tqdm

        writers = {"train": _Writer(tmp / "train.bin"), "val": _Writer(tmp / "val.bin")}
        clips, skipped = [], []
        jobs = [(f, rel, "train") for f, rel in train_files] + [(f, rel, "val") for f, rel in val_files]
        bps = bytes_per_sample(audio.quantizer)
        with tqdm(jobs, desc=f"preparing {label}", unit="file", disable=len(jobs) < 50 or _quiet(),
                  leave=False, file=sys.stderr) as bar:
            for f, rel, split in bar:
                try:
                    x, meta = read_audio(f, audio.sample_rate)
                except AudioReadError as e:
                    warn(f"skipping {e}")
                    skipped.append({"source": rel, "reason": str(e)})
                    continue
                parts = [(split, x)]
                if tail_fraction > 0:
                    n_val = int(len(x) * tail_fraction)
                    parts = [("train", x[:len(x) - n_val]), ("val", x[len(x) - n_val:])]
                for part_split, part in parts:
                    if len(part) == 0:
                        continue
                    sym = encode_clip(part, audio)
                    off = writers[part_split].add(sym)
                    clips.append({"source": rel, "split": part_split, "offset": off, "symbols": int(len(sym)),
                                  "samples": int(len(sym) // bps - 1), "original_rate": meta["original_rate"],
                                  "channels": meta["channels"], "duration": round(meta["duration"], 6)})
        for split, w in writers.items():
            w.close(tmp / f"{split}.idx.npy")
        n = len(jobs)
        if skipped:
            warn(f"skipped {len(skipped)} of {n} file(s) in {label}")
        if not any(c["split"] == "train" for c in clips):
            raise DataError(f"{label}: no usable training audio: {len(skipped)} of {n} file(s) skipped"
                            + (f" (first: {skipped[0]['reason']})" if skipped else ""))
        manifest.update({"clips": clips, "skipped": skipped, "files": n})

    return fill


def _fill_synth(audio: AudioConfig, val_fraction: float):
    def fill(tmp: Path, manifest: dict) -> None:
        from bytemamba.data.synth import synth_corpus

        clips_x = synth_corpus(audio.synth_seconds, audio.synth_seed, audio.sample_rate)
        names = [f"synth/{i:05d}" for i in range(len(clips_x))]
        flags = split_files(names, val_fraction)
        writers = {"train": _Writer(tmp / "train.bin"), "val": _Writer(tmp / "val.bin")}
        clips = []
        for name, held, x in zip(names, flags, clips_x):
            split = "val" if held else "train"
            sym = encode_clip(x, audio)
            off = writers[split].add(sym)
            clips.append({"source": name, "split": split, "offset": off, "symbols": int(len(sym)),
                          "original_rate": audio.sample_rate, "channels": 1,
                          "duration": round(len(x) / audio.sample_rate, 6)})
        for split, w in writers.items():
            w.close(tmp / f"{split}.idx.npy")
        manifest.update({"clips": clips, "skipped": [], "files": len(clips)})

    return fill


def prepare_audio(data: DataConfig, audio: AudioConfig) -> Prepared:
    """Prepare (or reuse) the cache for a recipe's [data] and [audio] sections."""
    settings = _settings(audio)
    if not data.path:
        label = f"synth(seed {audio.synth_seed}, {audio.synth_seconds:g} s)"
        from bytemamba.data.synth import SYNTH_VERSION
        key_src = {"v": CACHE_VERSION, "synth": [audio.synth_seconds, audio.synth_seed, SYNTH_VERSION],
                   "val_fraction": data.val_fraction, **settings}
        manifest = {"kind": "synth", "synth_seconds": audio.synth_seconds, "synth_seed": audio.synth_seed}
        fill = _fill_synth(audio, data.val_fraction)
    else:
        root, files = audio_sources(data.path, data.pattern)
        label = Path(data.path).name or str(root)
        listing = _listing(root, files)
        rels = [r for r, _, _ in listing]
        tail = 0.0
        if audio.val_path:
            vroot, vfiles = audio_sources(audio.val_path, data.pattern)
            vlisting = _listing(vroot, vfiles)
            train_files = list(zip(files, rels))
            val_files = [(f, _rel(vroot, f)) for f in vfiles]
            key_val = [str(vroot.resolve()), vlisting]
        elif len(files) == 1:
            train_files, val_files, tail = list(zip(files, rels)), [], data.val_fraction
            key_val = ["tail", data.val_fraction]
        else:
            cand = [i for i, f in enumerate(files) if f.suffix.lower() in AUDIO_SUFFIXES] or list(range(len(files)))
            flags = [False] * len(files)
            for i, v in zip(cand, split_files([rels[i] for i in cand], data.val_fraction)):
                flags[i] = v
            train_files = [(f, r) for f, r, v in zip(files, rels, flags) if not v]
            val_files = [(f, r) for f, r, v in zip(files, rels, flags) if v]
            key_val = ["hash", data.val_fraction]
        key_src = {"v": CACHE_VERSION, "root": str(root.resolve()), "files": listing, "val": key_val,
                   "pattern": data.pattern, **settings}
        manifest = {"kind": "files", "root": str(root.resolve()), "path": str(data.path),
                    "val_path": audio.val_path, "val_fraction": data.val_fraction}
        fill = _fill_files(train_files, val_files, audio, tail, label)
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:24]
    cdir = cache_root(audio) / key
    manifest.update({"format": "bytemamba-audio", "version": CACHE_VERSION, "key": key, **settings,
                     "bytes_per_sample": bytes_per_sample(audio.quantizer),
                     "clip_prefix": "each clip starts with the quantized zero (one silent sample)"})
    reused = (cdir / "done").exists()
    if not reused:
        _build(cdir, key, fill, manifest)
    manifest = json.loads((cdir / "manifest.json").read_text())
    train, val = _load(cdir, "train", audio, label), _load(cdir, "val", audio, label)
    n_train = sum(1 for c in manifest["clips"] if c["split"] == "train")
    secs = len(train) / bytes_per_sample(audio.quantizer) / audio.sample_rate
    info(f"audio: {'reusing' if reused else 'prepared'} {cdir}: {n_train} train clips ({secs:,.1f} s), "
         f"{len(manifest['clips']) - n_train} val clips, {audio.quantizer} at {audio.sample_rate} Hz"
         + (f"; {len(manifest['skipped'])} file(s) were skipped (see manifest.json)"
            if reused and manifest["skipped"] else ""))
    return Prepared(cdir, train, val, manifest, reused)


def build_audio_streams(data: DataConfig, audio: AudioConfig) -> tuple[SymbolStream, SymbolStream]:
    """(train, validation) streams of an audio recipe (`data.path == ""`: the embedded synth corpus)."""
    prep = prepare_audio(data, audio)
    return prep.train, prep.val


# ---- evaluation -----------------------------------------------------------------------------------

def read_eval_files(path, audio: AudioConfig, pattern: str = "*") -> tuple[list[Path], dict]:
    """Files of a folder / list / file decoded for evaluation, bad ones skipped with a warning."""
    _, files = audio_sources(path, pattern)
    arrays, skipped = {}, 0
    for f in files:
        try:
            arrays[f] = read_symbols(f, audio)
        except AudioReadError as e:
            warn(f"skipping {e}")
            skipped += 1
    if skipped:
        warn(f"skipped {skipped} of {len(files)} file(s) in {path}")
    if not arrays:
        raise DataError(f"{path}: no usable audio: all {len(files)} file(s) skipped")
    return list(arrays), arrays


def eval_audio(model, audio: AudioConfig, path, window: int = 4096, pattern: str = "*") -> dict:
    """Streaming bits per symbol over held-out audio; for pcm16 also per byte and per sample (2x)."""
    from bytemamba.evaluate import eval_files

    files, arrays = read_eval_files(path, audio, pattern)
    res = eval_files(model, files, window=window, read=arrays.__getitem__)
    bps = bytes_per_sample(audio.quantizer)
    res["bytes_per_sample"] = bps
    res["bits_per_sample"] = res["bits_per_symbol"] * bps
    if bps == 2:
        res["bits_per_byte"] = res["bits_per_symbol"]
    res["seconds"] = res["symbols"] / bps / audio.sample_rate
    return res


def describe_eval(res: dict) -> str:
    """One line for `bytemamba eval` of an audio model."""
    head = (f"{res['bits_per_byte']:.4f} bits per byte, {res['bits_per_sample']:.4f} bits per sample"
            if res["bytes_per_sample"] == 2 else f"{res['bits_per_sample']:.4f} bits per sample")
    return (f"{head} over {res['symbols'] // res['bytes_per_sample']:,} samples ({res['seconds']:,.1f} s) "
            f"in {len(res['files'])} file(s)")
