"""Text (or any bytes) as symbol streams: one file, a folder of files, or the embedded default corpus.

- One file: read in place through a memmap; the last `val_fraction` of its bytes is validation.
- A folder: every file matching `pattern` (recursively, sorted), each a document; a held-out set of files
  (chosen by a hash of the relative path, so the split does not move when files are added) is validation.
  The files are concatenated once into a cache (keyed by names, sizes and mtimes) and memmapped after.
- The embedded default (`path = ""`): the running interpreter's standard-library sources (`*.py`, outside
  site-packages), which exist wherever Python runs. No download.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from bytemamba.config import DataConfig
from bytemamba.data.stream import DataError, SymbolStream


def cache_root() -> Path:
    return Path(os.environ.get("BYTEMAMBA_CACHE", Path.home() / ".cache" / "bytemamba"))


def default_corpus_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py")
                   if not skip.intersection(p.relative_to(root).parts) and p.is_file())
    return root, files


def is_validation_file(rel: str, val_fraction: float) -> bool:
    return (zlib.crc32(rel.encode("utf-8", "surrogateescape")) % 10_000) < val_fraction * 10_000


def _write_stream(files: list[Path], out: Path) -> None:
    starts, pos = [], 0
    with open(out.with_suffix(".bin"), "wb") as f:
        for p in files:
            data = p.read_bytes()
            if not data:
                continue
            starts.append(pos)
            f.write(data)
            pos += len(data)
    np.save(out.with_suffix(".idx.npy"), np.asarray(starts, dtype=np.int64))


def _load_stream(base: Path, name: str) -> SymbolStream:
    binf = base.with_suffix(".bin")
    starts = np.load(base.with_suffix(".idx.npy"))
    if binf.stat().st_size == 0:
        return SymbolStream(np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.int64), name)
    return SymbolStream(np.memmap(binf, dtype=np.uint8, mode="r"), starts, name)


def folder_streams(root: Path, files: list[Path], val_fraction: float, label: str):
    """Concatenate `files` into cached train / val streams (built once, atomically)."""
    listing = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([str(root.resolve()), listing, val_fraction]).encode()).hexdigest()[:20]
    cdir = cache_root() / "text" / key
    if not (cdir / "done").exists():
        train = [p for p, (rel, _, _) in zip(files, listing) if not is_validation_file(rel, val_fraction)]
        val = [p for p, (rel, _, _) in zip(files, listing) if is_validation_file(rel, val_fraction)]
        tmp = cdir.parent / f".{key}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        _write_stream(train, tmp / "train")
        _write_stream(val, tmp / "val")
        (tmp / "sources.json").write_text(json.dumps({"root": str(root), "files": listing}))
        (tmp / "done").write_text("ok\n")
        try:
            tmp.rename(cdir)
        except OSError:           # another process finished first: use its copy
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    train, val = _load_stream(cdir / "train", f"{label}:train"), _load_stream(cdir / "val", f"{label}:val")
    if len(train) == 0:
        raise DataError(f"{label}: no training data (every file is empty or held out)")
    return train, val


def build_text_streams(cfg: DataConfig) -> tuple[SymbolStream, SymbolStream]:
    """Train and validation streams for a text recipe's [data] section."""
    if not cfg.path:
        root, files = default_corpus_files()
        if not files:
            raise DataError(f"the default corpus is empty: no *.py files under {root}")
        return folder_streams(root, files, cfg.val_fraction, "stdlib")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_file():
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"data file is empty: {path}")
        data = np.memmap(path, dtype=np.uint8, mode="r")
        n_val = int(size * cfg.val_fraction)
        starts = np.zeros(1, dtype=np.int64)
        return (SymbolStream(data[:size - n_val], starts, f"{path.name}:train"),
                SymbolStream(data[size - n_val:], starts, f"{path.name}:val"))
    files = sorted(p for p in path.rglob(cfg.pattern) if p.is_file() and p.stat().st_size > 0)
    if not files:
        raise DataError(f"data folder {path} holds no non-empty files matching {cfg.pattern!r}")
    return folder_streams(path, files, cfg.val_fraction, path.name)
