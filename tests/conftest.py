"""Shared fixtures: every test session writes its caches under a temporary directory, never ~/.cache."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Set before any bytemamba module reads it (cache_root() reads the variable at call time anyway).
_SESSION_CACHE = tempfile.mkdtemp(prefix="bytemamba-test-cache-")
os.environ["BYTEMAMBA_CACHE"] = _SESSION_CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


# The tests run tiny shapes: one intra-op thread is 5-8x faster than two on a busy 2-core machine
# (thread contention dominates). BYTEMAMBA_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("BYTEMAMBA_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parent.parent

# A small deterministic text corpus: a few kilobytes of Python-like lines (enough for windows of 33).
_LINES = [
    "def add(a, b):\n    return a + b\n\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n",
    "for i in range(10):\n    print(i * i)\n\n",
    "import os\nprint(os.getcwd())\n\n",
    "def mul(a, b):\n    return a * b\n\n",
]


def make_text(n_bytes: int = 6000) -> bytes:
    out, i = [], 0
    while sum(map(len, out)) < n_bytes:
        out.append(_LINES[i % len(_LINES)])
        i += 1
    return "".join(out).encode()


@pytest.fixture
def text_file(tmp_path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_bytes(make_text())
    return p


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("BYTEMAMBA_CACHE", str(d))
    return d
