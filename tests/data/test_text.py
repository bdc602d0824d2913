"""Text streams: file and folder splits, document boundaries as resets, the pure sampler, errors, cache."""

import numpy as np
import pytest
import torch

from bytemamba.config import Config, DataConfig
from bytemamba.data import build_streams, make_sampler
from bytemamba.data import text as tmod
from bytemamba.data.stream import DataError, SymbolStream, WindowSampler
from bytemamba.data.text import build_text_streams, is_validation_file
from bytemamba.errors import UserError


def write_folder(root, n=40, size=50):
    files = {}
    for i in range(n):
        sub = root / ("sub" if i % 3 == 0 else ".") / f"f{i:02d}.txt"
        sub.parent.mkdir(parents=True, exist_ok=True)
        data = bytes([(i * 7 + j) % 251 for j in range(size + i)])
        sub.write_bytes(data)
        files[str(sub.resolve().relative_to(root.resolve()))] = data
    return files


def test_single_file_split(tmp_path):
    data = bytes(range(256)) * 40
    p = tmp_path / "a.bin"
    p.write_bytes(data)
    train, val = build_text_streams(DataConfig(path=str(p), val_fraction=0.25))
    n_val = int(len(data) * 0.25)
    assert len(train) + len(val) == len(data) and len(val) == n_val
    assert bytes(np.asarray(train.data)) == data[:-n_val]
    assert bytes(np.asarray(val.data)) == data[-n_val:]


def test_single_file_no_validation(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"x" * 100)
    train, val = build_text_streams(DataConfig(path=str(p), val_fraction=0.0))
    assert len(train) == 100 and len(val) == 0


def test_folder_split_holds_out_whole_files(tmp_path, cache_dir):
    root = tmp_path / "corpus"
    files = write_folder(root)
    train, val = build_text_streams(DataConfig(path=str(root), val_fraction=0.25))
    rels = sorted(files)                          # the builder's order: sorted paths
    want_val = [r for r in rels if is_validation_file(r, 0.25)]
    want_train = [r for r in rels if not is_validation_file(r, 0.25)]
    assert want_val and want_train                # the hash split put files on both sides
    assert bytes(np.asarray(train.data)) == b"".join(files[r] for r in want_train)
    assert bytes(np.asarray(val.data)) == b"".join(files[r] for r in want_val)
    # each file is a document
    spans = train.doc_spans()
    assert [bytes(np.asarray(train.data[s:e])) for s, e in spans] == [files[r] for r in want_train]
    assert len(val.doc_spans()) == len(want_val)


def test_folder_split_is_stable_when_files_are_added(tmp_path, cache_dir):
    root = tmp_path / "corpus"
    files = write_folder(root, n=30)
    _, val1 = build_text_streams(DataConfig(path=str(root), val_fraction=0.3))
    (root / "zz_new.txt").write_bytes(b"new file" * 10)
    _, val2 = build_text_streams(DataConfig(path=str(root), val_fraction=0.3))
    old_val = b"".join(files[r] for r in sorted(files) if is_validation_file(r, 0.3))
    extra = b"new file" * 10 if is_validation_file("zz_new.txt", 0.3) else b""
    assert bytes(np.asarray(val2.data)) == old_val + extra
    assert bytes(np.asarray(val1.data)) == old_val


def test_folder_pattern_and_empty_files(tmp_path, cache_dir):
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.py").write_bytes(b"print(1)\n")
    (root / "b.txt").write_bytes(b"ignored")
    (root / "c.py").write_bytes(b"")
    (root / "d.py").write_bytes(b"x = 2\n")
    train, val = build_text_streams(DataConfig(path=str(root), pattern="*.py", val_fraction=0.0))
    assert bytes(np.asarray(train.data)) == b"print(1)\nx = 2\n"
    assert list(train.doc_starts) == [0, 9]


def test_doc_boundaries_become_resets_at_the_right_positions():
    s = SymbolStream(np.arange(30, dtype=np.uint8), np.array([0, 4, 5, 17]), "t")
    flags = s.reset_flags(3, 10)                     # positions 3..12
    assert list(np.nonzero(flags)[0]) == [1, 2]      # documents start at 4 and 5
    assert list(np.nonzero(s.reset_flags(0, 30))[0]) == [0, 4, 5, 17]
    assert not s.reset_flags(6, 11).any()            # 6..16: inside one document
    assert list(np.nonzero(s.reset_flags(6, 12))[0]) == [11]
    ids, reset = s.windows(np.array([3, 15]), 4)
    assert ids.tolist() == [[3, 4, 5, 6, 7], [15, 16, 17, 18, 19]]
    assert reset.tolist() == [[False, True, True, False], [False, False, True, False]]


def test_sampler_resets_match_documents_in_a_folder(tmp_path, cache_dir):
    root = tmp_path / "c"
    root.mkdir()
    for i in range(6):
        (root / f"{i}.txt").write_bytes(bytes([65 + i]) * (20 + 3 * i))     # each file one repeated byte
    train, _ = build_text_streams(DataConfig(path=str(root), val_fraction=0.0))
    sampler = WindowSampler(train, seq_len=16, batch_size=8, seed=3)
    for step in range(5):
        b = sampler.batch(step)
        inp, reset = b["input"], b["reset"]
        assert torch.equal(b["target"][:, :-1], inp[:, 1:])
        # a document begins exactly where the byte changes from the previous position
        change = torch.zeros_like(reset)
        change[:, 1:] = inp[:, 1:] != inp[:, :-1]
        starts = torch.from_numpy(train.doc_starts)
        first = torch.tensor([int(s) for s in sampler.starts(step)])
        change[:, 0] = torch.isin(first, starts)
        assert torch.equal(reset, change)


def test_doc_boundaries_off_gives_no_reset(text_file):
    cfg = Config()
    cfg.data.path, cfg.data.doc_boundaries = str(text_file), False
    cfg.train.seq_len, cfg.train.batch_size = 16, 2
    train, _ = build_streams(cfg.data, cfg.audio)
    assert "reset" not in make_sampler(train, cfg, "train").batch(0)


def test_sampler_is_a_pure_function_of_seed_step_micro_rank(text_file):
    s = SymbolStream(np.frombuffer(text_file.read_bytes(), dtype=np.uint8), np.array([0, 100, 2000]))
    a = WindowSampler(s, 16, 4, seed=7)
    b = WindowSampler(s, 16, 4, seed=7)
    for step, micro in [(5, 0), (0, 0), (5, 1), (123, 2)]:
        x, y = b.batch(step, micro), a.batch(step, micro)         # in a different order on purpose
        assert all(torch.equal(x[k], y[k]) for k in ("input", "target", "reset"))
    assert not torch.equal(a.batch(5)["input"], a.batch(6)["input"])
    assert not torch.equal(a.batch(5, 0)["input"], a.batch(5, 1)["input"])
    assert not torch.equal(a.batch(5)["input"], WindowSampler(s, 16, 4, seed=8).batch(5)["input"])
    assert not torch.equal(a.batch(5)["input"], WindowSampler(s, 16, 4, seed=7, split="val").batch(5)["input"])


def test_two_ranks_equal_one_rank_with_double_batch(text_file):
    s = SymbolStream(np.frombuffer(text_file.read_bytes(), dtype=np.uint8), np.array([0, 1000]))
    one = WindowSampler(s, 16, 8, seed=1)
    r0 = WindowSampler(s, 16, 4, seed=1, rank=0, world_size=2)
    r1 = WindowSampler(s, 16, 4, seed=1, rank=1, world_size=2)
    for step in range(3):
        for k in ("input", "target", "reset"):
            torch.testing.assert_close(torch.cat([r0.batch(step)[k], r1.batch(step)[k]]), one.batch(step)[k])


def test_windows_stay_inside_the_stream():
    s = SymbolStream(np.arange(20, dtype=np.uint8))
    sampler = WindowSampler(s, 19, 64, seed=0)       # exactly one window fits
    assert (sampler.starts(0) == 0).all()
    with pytest.raises(DataError, match="fewer than one window"):
        WindowSampler(s, 20, 1, seed=0)


@pytest.mark.parametrize("kind", ["missing", "empty_file", "empty_folder", "only_empty_files"])
def test_missing_or_empty_data_is_a_clear_error(tmp_path, kind, cache_dir):
    p = tmp_path / "data"
    if kind == "empty_file":
        p.write_bytes(b"")
    elif kind == "empty_folder":
        p.mkdir()
    elif kind == "only_empty_files":
        p.mkdir()
        (p / "a.txt").write_bytes(b"")
    with pytest.raises(DataError) as e:
        build_text_streams(DataConfig(path=str(p)))
    assert str(p) in str(e.value) and isinstance(e.value, UserError)


def test_folder_whose_files_are_all_held_out(tmp_path, cache_dir):
    root = tmp_path / "c"
    root.mkdir()
    name = next(f"{i}.txt" for i in range(1000) if is_validation_file(f"{i}.txt", 0.5))
    (root / name).write_bytes(b"abc" * 10)
    with pytest.raises(DataError, match="no training data"):
        build_text_streams(DataConfig(path=str(root), val_fraction=0.5))


def test_cache_is_reused(tmp_path, cache_dir, monkeypatch):
    root = tmp_path / "c"
    files = write_folder(root, n=10)
    t1, v1 = build_text_streams(DataConfig(path=str(root), val_fraction=0.2))
    built = list((cache_dir / "text").iterdir())
    assert len(built) == 1 and (built[0] / "done").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in built[0].iterdir()}

    def no_rewrite(*a, **k):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(tmod, "_write_stream", no_rewrite)
    t2, v2 = build_text_streams(DataConfig(path=str(root), val_fraction=0.2))
    assert bytes(np.asarray(t2.data)) == bytes(np.asarray(t1.data))
    assert list(t2.doc_starts) == list(t1.doc_starts)
    assert {p.name: p.stat().st_mtime_ns for p in built[0].iterdir()} == mtimes
    monkeypatch.undo()
    # a changed file is a new cache entry
    monkeypatch.setenv("BYTEMAMBA_CACHE", str(cache_dir))
    (root / "f01.txt").write_bytes(b"changed contents")
    t3, _ = build_text_streams(DataConfig(path=str(root), val_fraction=0.2))
    assert len(list((cache_dir / "text").iterdir())) == 2
    assert len(files) == 10


def test_default_corpus_is_the_stdlib(monkeypatch, tmp_path):
    """The embedded default: real Python sources, file starts as documents. Uses a 2-file stand-in."""
    root = tmp_path / "lib"
    (root / "site-packages").mkdir(parents=True)
    (root / "a.py").write_bytes(b"import os\n")
    (root / "b.py").write_bytes(b"import sys\n")
    (root / "site-packages" / "c.py").write_bytes(b"skipped\n")
    monkeypatch.setattr(tmod.sysconfig, "get_paths", lambda: {"stdlib": str(root)})
    monkeypatch.setenv("BYTEMAMBA_CACHE", str(tmp_path / "cache"))
    train, val = build_text_streams(DataConfig(path="", val_fraction=0.0))
    assert bytes(np.asarray(train.data)) == b"import os\nimport sys\n"
    assert list(train.doc_starts) == [0, 10]


def test_validation_windows_do_not_depend_on_the_training_seed(text_file):
    cfg = Config()
    cfg.data.path = str(text_file)
    cfg.train.seq_len, cfg.train.batch_size = 16, 3
    _, val = build_streams(cfg.data, cfg.audio)
    a = make_sampler(val, cfg, "val").batch(0)["input"]
    cfg.train.seed += 1
    assert torch.equal(make_sampler(val, cfg, "val").batch(0)["input"], a)
    train_stream, _ = build_streams(cfg.data, cfg.audio)
    t1 = make_sampler(train_stream, cfg, "train").batch(0)["input"]
    cfg.train.seed += 1
    assert not torch.equal(make_sampler(train_stream, cfg, "train").batch(0)["input"], t1)
