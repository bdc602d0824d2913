"""Data-parallel training: two CPU processes (gloo) against one process with the same global batch.

`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m bytemamba train ...` with batch 4
per rank must give the same losses (to float tolerance) as one process with batch 8; both ranks must hold
identical parameters (checked exactly, bit for bit, through the fingerprints every checkpoint records per
rank); only the main process writes metrics, checkpoints and the exported model.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from bytemamba.checkpoint import CKPT_SUBDIR, list_checkpoints, verify
from bytemamba.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.d_model=32", "model.n_layer=2", "model.d_state=8", "train.seq_len=32", "train.trackers=none",
        "train.sample_bytes=0", "train.log_every=1", "train.eval_batches=2", "train.eval_every=4",
        "optim.warmup_steps=2", "train.device=cpu", "model.scan_backend=torch", "train.max_steps=8",
        "train.save_every=4", "train.keep_checkpoints=2", "train.grad_accum=2"]


def _corpus(path: Path) -> Path:
    import random
    rng = random.Random(1)
    words = "a byte level model sees every character of the text and must learn words by itself".split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(2000)))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_ranks_take_disjoint_slices_of_one_global_batch(tmp_path):
    from bytemamba.data import build_streams, make_sampler

    cfg = load_config(None, TINY + [f"data.path={_corpus(tmp_path / 'c.txt')}", "train.batch_size=4"])
    stream, _ = build_streams(cfg.data, cfg.audio)
    r0, r1 = (make_sampler(stream, cfg, "train", r, 2).starts(5, 1) for r in (0, 1))
    cfg.train.batch_size = 8
    whole = make_sampler(stream, cfg, "train", 0, 1).starts(5, 1)
    assert list(r0) + list(r1) == list(whole) and list(r0) != list(r1)


def test_two_process_data_parallel_matches_one_process(tmp_path):
    data = _corpus(tmp_path / "corpus.txt")
    dp, single = tmp_path / "dp", tmp_path / "single"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "bytemamba", "train", *TINY,
           f"data.path={data}", f"train.out_dir={dp}", "train.batch_size=4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # meanwhile, the same global batch (2 x 4) in this process
    from accelerate.state import AcceleratorState, GradientState
    from bytemamba.train import train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train(load_config(None, TINY + [f"data.path={data}", f"train.out_dir={single}",
                                              "train.batch_size=8"]))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        torch.set_num_threads(threads)
    text, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, text[-3000:]
    assert " x2, precision" in text

    # logging on the main process only: one metrics line per step
    a, b = _rows(dp), _rows(single)
    assert [r["step"] for r in a] == list(range(1, 9))
    for x, y in zip(a, b):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5, abs_tol=1e-6), (x, y)
    # validation gathered over ranks: each rank scores half the windows, the sum is the whole
    ra, rb = json.loads((dp / "result.json").read_text()), ref
    assert math.isclose(ra["val_bits_per_symbol"], rb["val_bits_per_symbol"], rel_tol=1e-5)

    # both ranks hold exactly the same parameters at every checkpoint
    good, bad = list_checkpoints(dp / CKPT_SUBDIR)
    assert not bad and [m["step"] for _, m in good] == [8, 4]
    for d, m in good:
        verify(d)
        assert m["world_size"] == 2
        assert len(m["rank_param_fingerprints"]) == 2 and len(set(m["rank_param_fingerprints"])) == 1
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(m["files"])

    # and they are the single-process parameters, to float tolerance
    from safetensors.torch import load_file
    wa, wb = load_file(dp / "model" / "model.safetensors"), load_file(single / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_two_processes_skip_and_stop_in_lockstep(tmp_path):
    """A NaN on one rank only and a SIGTERM to one rank only: both ranks act together, nobody hangs."""
    data = _corpus(tmp_path / "corpus.txt")
    out = tmp_path / "lockstep"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    overrides = [o for o in TINY if not o.startswith("train.grad_accum")] + [
        f"data.path={data}", f"train.out_dir={out}", "train.batch_size=4", "train.max_steps=50",
        "train.save_every=1000"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "tests" / "helpers" / "dp_faults.py"), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "stopped at step 5 (a signal on another rank)" in text

    rows = _rows(out)
    skipped = [r for r in rows if "skipped" in r]
    assert [r["step"] for r in skipped] == [3]
    from bytemamba.data import build_streams, make_sampler
    cfg = load_config(None, overrides)
    stream, _ = build_streams(cfg.data, cfg.audio)
    assert skipped[0]["bad_offsets"] == [int(make_sampler(stream, cfg, "train", 1, 2).starts(2, 0)[0])]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 4, 5]
    good, _ = list_checkpoints(out / CKPT_SUBDIR)
    (d, m), = good
    verify(d)
    assert m["step"] == 5 and m["bad_steps"] == 1 and len(set(m["rank_param_fingerprints"])) == 1


def test_two_processes_bad_audio_data_fail_together(tmp_path):
    """The main process prepares the data first; when that fails, the other rank must not wait for it at the
    barrier: both exit non-zero with the one-line message naming the path."""
    missing = tmp_path / "no_such_folder"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "bytemamba", "train", *TINY, "data.kind=audio",
           f"data.path={missing}", f"audio.cache_dir={tmp_path / 'cache'}", f"train.out_dir={tmp_path / 'out'}",
           "train.batch_size=4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert f"bytemamba: error: audio path not found: {missing}" in text, text[-3000:]
    assert 'bytemamba/train.py", line' not in text, text[-3000:]      # the launcher's traceback only, not ours
    assert not (tmp_path / "out" / "checkpoints").exists()
