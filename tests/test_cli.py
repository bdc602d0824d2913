"""The command line in subprocesses: train -> generate -> eval on what it wrote, and bad input as one
clear line on stderr with exit status 2 (no traceback)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bytemamba.config import ModelConfig
from bytemamba.models.io import save_model
from bytemamba.models.lm import ByteMambaLM

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.d_model=32", "model.n_layer=2", "train.batch_size=4", "train.seq_len=32",
        "train.trackers=none", "train.device=cpu", "train.log_every=2", "train.eval_batches=2",
        "optim.warmup_steps=2", "train.sample_bytes=20"]


def env(cache):
    return dict(os.environ, BYTEMAMBA_CACHE=str(cache), PYTHONPATH=str(REPO), TQDM_DISABLE="1",
                OMP_NUM_THREADS=os.environ.get("BYTEMAMBA_TEST_THREADS", "1"))


def cli(args, cache, timeout=300):
    return subprocess.run([sys.executable, "-m", "bytemamba", *map(str, args)], cwd=REPO, env=env(cache),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    text = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(300))
    (d / "data.txt").write_text(text)
    (d / "eval.txt").write_text(text[:1500])
    (d / "empty.txt").write_bytes(b"")
    (d / "bad_key.toml").write_text("[model]\nd_model = 32\nn_heads = 4\n")
    # small exported models to damage
    torch.manual_seed(0)
    model = ByteMambaLM(ModelConfig(d_model=16, n_layer=1, d_state=4))
    for name in ("no_weights", "mismatch", "audio", "good", "corrupt"):
        extra = {"data": {"kind": "audio" if name == "audio" else "text"}}
        save_model(model, d / name, extra=extra)
    (d / "no_weights" / "model.safetensors").unlink()
    raw = (d / "corrupt" / "model.safetensors").read_bytes()
    (d / "corrupt" / "model.safetensors").write_bytes(raw[: len(raw) // 3])
    meta = json.loads((d / "mismatch" / "config.json").read_text())
    meta["model"]["d_model"] = 24
    (d / "mismatch" / "config.json").write_text(json.dumps(meta))
    return d


@pytest.fixture(scope="module")
def trained(work):
    out = work / "OUT"
    r = cli(["train", REPO / "recipes" / "text_default.toml", "train.max_steps=12", f"train.out_dir={out}",
             f"data.path={work / 'data.txt'}", "train.eval_every=6", *TINY], work / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_train_writes_a_run_directory(trained):
    out, r = trained
    assert "Traceback" not in r.stderr
    for name in ("config.toml", "metrics.jsonl", "model/config.json", "model/model.safetensors"):
        assert (out / name).is_file(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[-1]["loss"] < rows[0]["loss"]
    assert "exported model" in r.stdout


def test_generate_on_what_train_wrote(trained, work):
    out, _ = trained
    r = cli(["generate", out / "model", "--prompt", "def ", "--max-bytes", "30", "--seed", "3"], work / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("def ") and len(r.stdout) > len("def ")
    r = cli(["generate", out / "model", "--prompt", "x", "--max-bytes", "5", "--num-samples", "2",
             "--temperature", "0"], work / "cache")
    assert r.returncode == 0 and r.stdout.count("--- sample") == 2


def test_eval_on_what_train_wrote(trained, work):
    out, _ = trained
    r = cli(["eval", out / "model", "--data", work / "eval.txt", "--window", "512"], work / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if "bits per byte" in x]
    assert line, r.stdout
    bpb = float(line[0].split()[0])
    n = len((work / "eval.txt").read_bytes())
    assert 0 < bpb < 8 and f"{n - 1:,} bytes" in line[0]


BAD = {
    # name: (argv, a phrase the one line must contain)
    "missing_data": (["train", "data.path={w}/nope.txt", "train.out_dir={w}/o1", *TINY], "nope.txt"),
    "empty_data": (["train", "data.path={w}/empty.txt", "train.out_dir={w}/o2", *TINY], "empty"),
    "unknown_key": (["train", "{w}/bad_key.toml", "train.out_dir={w}/o3"], "model.n_heads"),
    "wrong_type": (["train", "model.d_model=wide", "train.out_dir={w}/o4"], "model.d_model"),
    "missing_recipe": (["train", "{w}/nope.toml"], "nope.toml"),
    "missing_ckpt": (["generate", "{w}/no_such_dir", "--prompt", "a"], "no_such_dir"),
    "no_weights": (["generate", "{w}/no_weights", "--prompt", "a"], "model.safetensors"),
    "mismatch": (["eval", "{w}/mismatch", "--data", "{w}/data.txt"], "shape"),
    "audio_prompt": (["generate", "{w}/audio", "--prompt", "def "], "audio"),
    "eval_missing_data": (["eval", "{w}/good", "--data", "{w}/nope.bin"], "nope.bin"),
    "eval_empty_data": (["eval", "{w}/good", "--data", "{w}/empty.txt"], "empty"),
    "bad_top_p": (["generate", "{w}/good", "--prompt", "a", "--top-p", "0"], "top-p"),
    "bad_window": (["eval", "{w}/good", "--data", "{w}/data.txt", "--window", "0"], "--window"),
    "bad_max_bytes": (["generate", "{w}/good", "--prompt", "a", "--max-bytes", "0"], "--max-bytes"),
    "corrupt_weights": (["eval", "{w}/corrupt", "--data", "{w}/data.txt"], "safetensors"),
}


# These run as real subprocesses (the exit status and stderr a user sees, import-time warnings included);
# the rest of BAD runs in-process through cli.main, which is the same code path and much cheaper.
SUBPROCESS = ("missing_data", "unknown_key", "no_weights", "audio_prompt")


@pytest.fixture(scope="module")
def bad_runs(work):
    """The SUBPROCESS commands, started at once (they are independent): name -> (rc, stdout, stderr)."""
    procs = {}
    for name in SUBPROCESS:
        args = [a.format(w=work) for a in BAD[name][0]]
        procs[name] = subprocess.Popen([sys.executable, "-m", "bytemamba", *args], cwd=REPO,
                                       env=env(work / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    return {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}


def check_one_line(rc, err, name):
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err, err
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("bytemamba: error: ")
    assert BAD[name][1] in lines[0], lines[0]


@pytest.mark.parametrize("name", SUBPROCESS)
def test_bad_input_subprocess(bad_runs, name):
    check_one_line(*bad_runs[name][:1], bad_runs[name][2], name)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_in_process(work, name, capsys, monkeypatch):
    from bytemamba.cli import main
    monkeypatch.setenv("BYTEMAMBA_CACHE", str(work / "cache"))
    rc = main([a.format(w=work) for a in BAD[name][0]])
    check_one_line(rc, capsys.readouterr().err, name)
