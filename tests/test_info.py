"""`bytemamba info`: parameters, config, training step, data seen and last validation of a checkpoint."""

from __future__ import annotations

import json

import pytest

from bytemamba.cli import main
from bytemamba.config import load_config

TINY = ["model.d_model=32", "model.n_layer=2", "model.d_state=8", "train.batch_size=4", "train.seq_len=32",
        "train.trackers=none", "train.sample_bytes=0", "train.eval_batches=2", "train.eval_every=3",
        "optim.warmup_steps=2", "train.device=cpu", "train.max_steps=4", "train.save_every=2",
        "model.scan_backend=torch"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from accelerate.state import AcceleratorState, GradientState
    from bytemamba.train import train

    d = tmp_path_factory.mktemp("info")
    (d / "c.txt").write_text("all work and no play makes jack a dull boy\n" * 400)
    out = d / "run"
    try:
        result = train(load_config(None, TINY + [f"data.path={d / 'c.txt'}", f"train.out_dir={out}"]))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return out, result


def _info(capsys, *args) -> tuple[int, str, str]:
    rc = main(["info", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_info_on_an_exported_model(run, capsys):
    out, result = run
    from bytemamba.models.io import load_model
    model, _ = load_model(out / "model")
    rc, text, _ = _info(capsys, str(out / "model"))
    assert rc == 0
    assert f"parameters: {model.num_parameters():,}" in text
    assert "d_model 32, n_layer 2, d_state 8" in text
    assert "training step: 4" in text
    assert f"data seen: {4 * 4 * 32:,} bytes" in text and "passes over" in text
    assert f"last validation: {result['val_bits_per_symbol']:.4f} bits per byte" in text

    rc, js, _ = _info(capsys, str(out / "model"), "--json")
    r = json.loads(js)
    assert r["parameters"] == model.num_parameters() and r["step"] == 4 and r["symbols_seen"] == 512


def test_info_on_a_training_checkpoint_and_a_run(run, capsys):
    out, _ = run
    rc, text, _ = _info(capsys, str(out / "checkpoints" / "checkpoint_0"))
    assert rc == 0
    assert "verified" in text and "training step: 2" in text and "data seen: 256 bytes" in text
    assert "last validation: none yet" in text                       # first validation at step 3
    rc, text, _ = _info(capsys, str(out))
    assert rc == 0
    assert "checkpoint_1: step 4" in text and "checkpoint_0: step 2" in text and "[verified]" in text


def test_info_refuses_a_damaged_checkpoint_naming_the_file(run, capsys, tmp_path):
    import shutil
    out, _ = run
    ck = tmp_path / "ck"
    shutil.copytree(out / "checkpoints" / "checkpoint_0", ck)
    with open(ck / "model.safetensors", "ab") as f:
        f.write(b"\0")
    rc, _, err = _info(capsys, str(ck))
    assert rc == 2 and f"{ck / 'model.safetensors'} is damaged" in err
    rc, _, err = _info(capsys, str(tmp_path / "nowhere"))
    assert rc == 2 and "does not exist" in err
