"""Streaming evaluation: the state carried across windows makes the figure the whole file's true NLL."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bytemamba.config import ModelConfig
from bytemamba.data.stream import DataError
from bytemamba.evaluate import eval_files, list_files, stream_nll
from bytemamba.models.lm import ByteMambaLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ByteMambaLM(ModelConfig(d_model=16, n_layer=2, d_state=4, scan_backend="torch")).eval()


SYMS = np.frombuffer(b"def add(a, b):\n    return a + b\n\nclass P:\n    x = 1\n" * 3, dtype=np.uint8)


def full_forward_bits(model, syms):
    x = torch.from_numpy(syms.astype(np.int64))[None]
    with torch.no_grad():
        return F.cross_entropy(model(x[:, :-1])[0], x[0, 1:], reduction="sum").item() / math.log(2)


@pytest.mark.parametrize("window", [5, 64, 10_000])
def test_windows_carry_state_so_the_figure_is_the_full_context_nll(model, window):
    bits, n = stream_nll(model, SYMS, window=window)
    assert n == len(SYMS) - 1
    assert bits == pytest.approx(full_forward_bits(model, SYMS), rel=1e-5)


def test_short_streams(model):
    assert stream_nll(model, SYMS[:1]) == (0.0, 0)
    bits, n = stream_nll(model, SYMS[:2])
    assert n == 1 and bits == pytest.approx(full_forward_bits(model, SYMS[:2]), rel=1e-5)


def test_eval_files_each_file_from_a_fresh_state(model, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(SYMS[:50].tobytes())
    b.write_bytes(SYMS[50:].tobytes())
    res = eval_files(model, list_files(tmp_path), window=16)
    ba, bb = full_forward_bits(model, SYMS[:50]), full_forward_bits(model, SYMS[50:])
    assert res["symbols"] == len(SYMS) - 2
    assert res["bits_per_symbol"] == pytest.approx((ba + bb) / (len(SYMS) - 2), rel=1e-5)
    assert res["files"][str(a)] == pytest.approx(ba / 49, rel=1e-5)


def test_list_files_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list_files(tmp_path / "nope")
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        list_files(tmp_path / "e.txt")
    with pytest.raises(DataError, match="no non-empty files"):
        list_files(tmp_path)
