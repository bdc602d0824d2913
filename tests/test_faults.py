"""Surviving faults (bytemamba/train.py + bytemamba/checkpoint.py), on real tiny training runs on CPU.

- `kill -9` mid-run, then `--resume`: the losses after the resume point equal an uninterrupted run's.
- A damaged newest checkpoint is refused, naming the file, and resume falls back to the previous one.
- A format-1 checkpoint (counters also in Accelerate's custom_checkpoint_0.pkl) resumes without that pickle
  ever being opened.
- SIGTERM: the step finishes, a checkpoint is saved, exit status 0 with a message.
- A non-finite loss skips the update on every rank and is counted; K in a row abort with the step and offsets.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bytemamba.checkpoint import CKPT_SUBDIR, MANIFEST, CheckpointError, list_checkpoints, read_manifest, verify
from bytemamba.config import load_config
from bytemamba.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.d_model=32", "model.n_layer=2", "model.d_state=8", "train.batch_size=4", "train.seq_len=32",
        "train.trackers=none", "train.sample_bytes=0", "train.log_every=1", "train.eval_batches=2",
        "train.eval_every=1000", "optim.warmup_steps=2", "train.device=cpu", "model.scan_backend=torch"]
STEPS = 30                                   # long enough that the kill lands mid-run


def _corpus(path: Path) -> Path:
    import random
    rng = random.Random(0)
    words = "state space models read bytes one at a time and carry a summary of the past forward".split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)))
    return path


def _overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return TINY + [f"data.path={data}", f"train.out_dir={out}", f"train.max_steps={STEPS}",
                   "train.save_every=2", "train.keep_checkpoints=3", *extra]


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _train(overrides, resume=False):
    from bytemamba.train import train
    try:
        return train(load_config(None, overrides), resume=resume)
    finally:
        _reset_accelerate()


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _cli(*args, **kw) -> subprocess.Popen:
    # the same intra-op thread count as this process, whose in-process runs are the references
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.Popen([sys.executable, "-m", "bytemamba", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _checkpoint_steps(out: Path) -> list[int]:
    good, _ = list_checkpoints(out / CKPT_SUBDIR)
    return [m["step"] for _, m in good]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run, in this process."""
    d = tmp_path_factory.mktemp("faults")
    data = _corpus(d / "corpus.txt")
    out = d / "reference"
    _train(_overrides(data, out))
    return data, out


def test_uninterrupted_run_keeps_last_k_verified_checkpoints(reference):
    _, out = reference
    assert sorted(_checkpoint_steps(out)) == [STEPS - 4, STEPS - 2, STEPS]   # keep_checkpoints=3 of 15 saves
    for d in (out / CKPT_SUBDIR).iterdir():
        m = verify(d)
        assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= set(m["files"])
        assert not [f for f in m["files"] if f.startswith("custom_checkpoint")]   # counters: the manifest's JSON
        assert m["format_version"] == 2 and m["symbols_seen"] == m["step"] * 4 * 32
    assert not any((out / ".checkpoints-tmp").glob("checkpoint_*"))    # nothing left half-written
    assert sorted(_losses(out)) == list(range(1, STEPS + 1))


def test_kill9_then_resume_matches_uninterrupted(reference, tmp_path):
    data, ref = reference
    out = tmp_path / "crashed"
    proc = _cli("train", *_overrides(data, out))
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not any(s >= 4 for s in _checkpoint_steps(out)):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    saved = max(_checkpoint_steps(out))
    assert 4 <= saved < STEPS

    _train(_overrides(data, out), resume=True)
    want, got = _losses(ref), _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))                    # crashed-run extras were dropped
    after = [s for s in want if s > saved]
    assert after
    for s in want:
        assert math.isclose(got[s], want[s], rel_tol=0, abs_tol=1e-5), (s, got[s], want[s])
    from safetensors.torch import load_file
    a, b = load_file(ref / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_damaged_checkpoint_is_refused_and_resume_falls_back(reference, tmp_path, capsys):
    data, ref = reference
    out = tmp_path / "damaged"
    shutil.copytree(ref, out)
    good, _ = list_checkpoints(out / CKPT_SUBDIR)
    newest, previous = good[0][0], good[1]
    weights = newest / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                                         # same size, one flipped byte
    weights.write_bytes(bytes(raw))
    (out / "metrics.jsonl").write_text("")                             # see what the resumed run writes
    stray = out / CKPT_SUBDIR / "checkpoint_99"                         # e.g. copied in by hand, no manifest
    stray.mkdir()
    (stray / "model.safetensors").write_bytes(b"")

    _train(_overrides(data, out), resume=True)
    said = capsys.readouterr().out
    assert f"{weights} is damaged" in said
    assert f"{stray / 'manifest.json'} is missing" in said
    assert f"falling back to {previous[0].name} (step {previous[1]['step']})" in said
    want, got = _losses(ref), _losses(out)
    assert sorted(got) == list(range(previous[1]["step"] + 1, STEPS + 1))
    for s in got:
        assert math.isclose(got[s], want[s], abs_tol=1e-5)
    verify(newest)                                                     # rewritten whole at the last step


def test_resume_refuses_when_no_checkpoint_is_good(reference, tmp_path, capsys):
    from bytemamba.cli import main

    data, ref = reference
    out = tmp_path / "all_bad"
    shutil.copytree(ref, out)
    for d in (out / CKPT_SUBDIR).iterdir():
        with open(d / "optimizer.bin", "r+b") as f:                    # truncated
            f.truncate(10)
    try:
        rc = main(["train", "--resume", *_overrides(data, out)])
    finally:
        _reset_accelerate()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "no usable checkpoint" in err[0] and "optimizer.bin is damaged" in err[0]


def test_resume_refuses_a_checkpoint_of_another_model(reference, tmp_path):
    data, ref = reference
    out = tmp_path / "other"
    shutil.copytree(ref, out)
    with pytest.raises(UserError, match=r"another model \(model.d_model=32 there, 48 now\)"):
        _train(_overrides(data, out, "model.d_model=48"), resume=True)


def test_sigterm_finishes_step_saves_and_exits_zero(tmp_path):
    data = _corpus(tmp_path / "corpus.txt")
    out = tmp_path / "term"
    proc = _cli("train", *TINY, f"data.path={data}", f"train.out_dir={out}", "train.max_steps=100000",
                "train.save_every=100000")
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, text
    assert "received SIGTERM" in text and "continue with --resume" in text
    last_step = max(_losses(out))
    assert _checkpoint_steps(out) == [last_step]                       # a checkpoint of the last finished step


def test_sigint_in_process_stops_after_the_step_with_a_checkpoint(reference, tmp_path, monkeypatch, capsys):
    """A real SIGINT delivered in the middle of step 3: step 3 completes, is saved, train() returns."""
    import bytemamba.train as tr

    data, ref = reference
    real, calls = tr.window_losses, {"n": 0}

    def interrupting(logits, target):
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        calls["n"] += 1
        return real(logits, target)

    monkeypatch.setattr(tr, "window_losses", interrupting)
    before = signal.getsignal(signal.SIGINT)      # default_int_handler, or SIG_IGN under nohup / a background job
    out = tmp_path / "int"
    result = _train(_overrides(data, out, "train.save_every=1000"))
    assert result["halted"] and result["stopped_by"] == "SIGINT" and result["step"] == 3
    assert "received SIGINT" in capsys.readouterr().out
    assert _checkpoint_steps(out) == [3] and sorted(_losses(out)) == [1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is before                         # handlers put back
    for s, loss in _losses(out).items():
        assert math.isclose(loss, _losses(ref)[s], abs_tol=1e-5)


def test_a_checkpoint_that_fails_mid_write_never_appears(reference, tmp_path, monkeypatch):
    """The second checkpoint dies after Accelerate wrote its files, before the manifest: it must not exist
    under checkpoints/, the error says what failed, and --resume continues from the first one."""
    import bytemamba.checkpoint as ck

    data, ref = reference
    real, calls = ck.write_manifest, {"n": 0}

    def failing(folder, info):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(folder, info)

    monkeypatch.setattr(ck, "write_manifest", failing)
    out = tmp_path / "full"
    with pytest.raises(ck.CheckpointError, match="checkpoint_1 failed: OSError.*No space left"):
        _train(_overrides(data, out))
    assert _checkpoint_steps(out) == [2]
    assert [d.name for d in (out / CKPT_SUBDIR).iterdir()] == ["checkpoint_0"]
    monkeypatch.setattr(ck, "write_manifest", real)
    _train(_overrides(data, out), resume=True)
    want, got = _losses(ref), _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in got:
        assert math.isclose(got[s], want[s], abs_tol=1e-5)


# ---- non-finite losses ------------------------------------------------------------------------------

def _poison(monkeypatch, bad_steps: set[int], row: int):
    """Make window `row` of the batches of the given (0-based) steps non-finite."""
    import bytemamba.train as tr

    real, calls = tr.window_losses, {"n": 0}

    def poisoned(logits, target):
        out = real(logits, target)
        if calls["n"] in bad_steps:
            out = out.clone()
            out[row] = float("nan")
        calls["n"] += 1
        return out

    monkeypatch.setattr(tr, "window_losses", poisoned)


def _train_offsets(cfg_overrides, step: int) -> list[int]:
    from bytemamba.data import build_streams, make_sampler
    cfg = load_config(None, cfg_overrides)
    train_stream, _ = build_streams(cfg.data, cfg.audio)
    return [int(x) for x in make_sampler(train_stream, cfg, "train").starts(step, 0)]


def test_nonfinite_loss_skips_the_step_and_counts_it(reference, tmp_path, monkeypatch):
    data, ref = reference
    ov = _overrides(data, tmp_path / "nan1", "train.max_steps=6")
    _poison(monkeypatch, {2}, row=1)
    result = _train(ov)
    assert result["bad_steps"] == 1 and result["step"] == 6
    rows = [json.loads(x) for x in (tmp_path / "nan1" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if "skipped" in r]
    assert [r["step"] for r in skipped] == [3]
    assert skipped[0]["bad_offsets"] == [_train_offsets(ov, 2)[1]]
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "nan1" / "model" / "model.safetensors").values())
    meta = json.loads((tmp_path / "nan1" / "model" / "config.json").read_text())
    assert meta["training"]["bad_steps"] == 1


def test_nonfinite_losses_in_a_row_abort_with_step_and_offsets(reference, tmp_path, monkeypatch):
    from bytemamba.train import TrainingAborted

    data, _ = reference
    ov = _overrides(data, tmp_path / "nan2", "train.max_bad_steps=3")
    _poison(monkeypatch, set(range(1, 1000)), row=2)
    with pytest.raises(TrainingAborted) as e:
        _train(ov)
    msg = str(e.value)
    assert isinstance(e.value, UserError)
    assert "aborting at step 4" in msg and "3 non-finite losses in a row" in msg
    assert str([_train_offsets(ov, 3)[2]]) in msg


class _Trap:
    """Unpickled, it creates the file `path` (what a malicious custom_checkpoint_0.pkl could do)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_format1_checkpoint_resumes_without_unpickling_its_custom_state(reference, tmp_path):
    data, ref = reference
    out = tmp_path / "format1"
    shutil.copytree(ref, out)
    good, _ = list_checkpoints(out / CKPT_SUBDIR)
    for d, _m in good[:2]:                                               # resume from step STEPS - 4
        shutil.rmtree(d)
    old, m = good[2]
    marker = tmp_path / "unpickled"
    torch.save({"step": 0, "trap": _Trap(marker)}, old / "custom_checkpoint_0.pkl")
    from bytemamba.checkpoint import file_table
    m.update(format_version=1, files=file_table(old))                   # as version 1 wrote it: the pickle listed
    (old / MANIFEST).write_text(json.dumps(m))
    verify(old)

    _train(_overrides(data, out), resume=True)
    assert not marker.exists()
    want, got = _losses(ref), _losses(out)
    assert [s for s in got if s > m["step"]] == list(range(m["step"] + 1, STEPS + 1))
    for s in range(m["step"] + 1, STEPS + 1):
        assert math.isclose(got[s], want[s], rel_tol=0, abs_tol=1e-5), (s, got[s], want[s])
    counters = json.loads((out / "model" / "config.json").read_text())["training"]
    assert counters == json.loads((ref / "model" / "config.json").read_text())["training"]
    assert counters["symbols_seen"] == STEPS * 4 * 32
    assert (old / "custom_checkpoint_0.pkl").is_file()                  # the old checkpoint is left as it was
    assert not any((out / ".checkpoints-tmp").glob("load-*"))          # the folder of links is gone
    torch.load(old / "custom_checkpoint_0.pkl", weights_only=False)    # the trap is armed: opening it springs it
    assert marker.exists()


def test_manifest_of_an_unknown_format_version_is_refused(reference, tmp_path):
    _, ref = reference
    d = tmp_path / "ckpt"
    shutil.copytree(list_checkpoints(ref / CKPT_SUBDIR)[0][0][0], d)
    m = json.loads((d / MANIFEST).read_text())
    m["format_version"] = 3
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"format_version 3: written by another bytemamba \(this one reads "
                                              r"versions 1, 2\)"):
        read_manifest(d)
