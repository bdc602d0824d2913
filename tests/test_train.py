"""The training loop on CPU with a tiny model: the loss falls, a halted + resumed run repeats the losses
of an uninterrupted one, and the exported model loads."""

import json
import math

import pytest
import torch

from bytemamba.config import OptimConfig, load_config
from bytemamba.models.lm import ByteMambaLM
from bytemamba.train import lr_at, param_groups, train

pytestmark = pytest.mark.slow

STEPS = 20


def tiny_cfg(data, out, *extra):
    return load_config(None, [
        "model.d_model=32", "model.n_layer=2", "model.scan_backend=torch",
        "train.batch_size=4", "train.seq_len=32", "train.trackers=none", "train.device=cpu",
        f"data.path={data}", f"train.out_dir={out}", f"train.max_steps={STEPS}", "train.sample_bytes=0",
        "train.log_every=5", "train.eval_every=10", "train.eval_batches=2", "train.save_every=100",
        "optim.warmup_steps=5", "data.val_fraction=0.1", *extra])


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    lines = ["def add(a, b):\n    return a + b\n\n", "class Point:\n    x = 1\n    y = 2\n\n",
             "for i in range(10):\n    print(i * i)\n\n"]
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_bytes("".join(lines[i % 3] for i in range(200)).encode())
    return p


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = train(tiny_cfg(corpus, out))
    return out, result


def test_loss_falls(straight):
    out, result = straight
    ls = losses(out)
    assert len(ls) == STEPS and all(math.isfinite(x) for x in ls)
    assert ls[0] > math.log(256) - 0.5                       # starts near uniform over 256 symbols
    assert sum(ls[-3:]) / 3 < ls[0] - 0.8                   # and falls clearly
    assert result["step"] == STEPS and math.isfinite(result["val_bits_per_symbol"])


def test_resume_continuity(straight, corpus, tmp_path):
    out_a, _ = straight
    out_b = tmp_path / "resumed"
    r1 = train(tiny_cfg(corpus, out_b, "train.halt_at=10"))
    assert r1["step"] == 10 and r1.get("halted")
    assert not (out_b / "model").exists()                   # a halted run exports nothing
    assert len(losses(out_b)) == 10
    r2 = train(tiny_cfg(corpus, out_b), resume=True)
    assert r2["step"] == STEPS
    a, b = losses(out_a), losses(out_b)
    assert len(b) == STEPS
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= 1e-5, f"step {i + 1}: {x} (straight) != {y} (resumed)"
    ma = ByteMambaLM.from_pretrained(out_a / "model")
    mb = ByteMambaLM.from_pretrained(out_b / "model")
    for k, v in ma.state_dict().items():
        torch.testing.assert_close(mb.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_resume_continuity_with_grad_accum(corpus, tmp_path):
    """The same with 2 micro-batches per step (Accelerate's accumulation counter restarts on resume)."""
    extra = ("train.grad_accum=2", "train.max_steps=8", "train.eval_every=4")
    train(tiny_cfg(corpus, tmp_path / "a", *extra))
    train(tiny_cfg(corpus, tmp_path / "b", *extra, "train.halt_at=4"))
    train(tiny_cfg(corpus, tmp_path / "b", *extra), resume=True)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 8
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= 1e-5, f"step {i + 1}: {x} (straight) != {y} (resumed)"


def test_resume_without_checkpoint_is_a_user_error(corpus, tmp_path):
    from bytemamba.errors import UserError
    with pytest.raises(UserError, match="no checkpoint"):
        train(tiny_cfg(corpus, tmp_path / "empty"), resume=True)


def test_exported_model_loads_and_matches_config(straight):
    out, _ = straight
    m = ByteMambaLM.from_pretrained(out / "model")
    assert m.config.d_model == 32 and m.config.n_layer == 2
    assert m.lm_head.weight is m.backbone.embedding.weight
    meta = json.loads((out / "model" / "config.json").read_text())
    assert meta["data"]["kind"] == "text" and meta["training"]["step"] == STEPS
    assert load_config(out / "config.toml") == tiny_cfg(meta["data"]["path"], out)
    # the exported weights are the trained ones: they predict the corpus better than a fresh model
    x = torch.tensor([list(b"def add(a, b):\n    return a + b\n\nclass Point:\n")])
    with torch.no_grad():
        trained = torch.nn.functional.cross_entropy(m(x[:, :-1])[0], x[0, 1:])
        torch.manual_seed(0)
        fresh = torch.nn.functional.cross_entropy(ByteMambaLM(m.config)(x[:, :-1])[0], x[0, 1:])
    assert trained < fresh - 0.5


def test_lr_schedule():
    c = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, c, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, c, 20) == pytest.approx(1.0)
    assert lr_at(12, c, 20) == pytest.approx(0.55)
    assert lr_at(20, c, 20) == pytest.approx(0.1)
    assert lr_at(50, c, 20) == pytest.approx(0.1)


def test_no_weight_decay_groups():
    torch.manual_seed(0)
    m = ByteMambaLM(load_config(None, ["model.d_model=16", "model.n_layer=1"]).model)
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    dn = {names[id(p)] for p in decay["params"]}
    nn_ = {names[id(p)] for p in no_decay["params"]}
    assert dn == {"backbone.layers.0.mixer.in_proj.weight", "backbone.layers.0.mixer.conv1d.weight",
                  "backbone.layers.0.mixer.x_proj.weight", "backbone.layers.0.mixer.dt_proj.weight",
                  "backbone.layers.0.mixer.out_proj.weight"}
    assert "backbone.layers.0.mixer.A_log" in nn_ and "backbone.layers.0.mixer.D" in nn_
    assert "backbone.embedding.weight" in nn_
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))
