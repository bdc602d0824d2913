"""Exported directories: round trip, re-tied weights, no duplicate tensors, clear errors, atomic writes."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bytemamba.config import ModelConfig
from bytemamba.errors import UserError
from bytemamba.models import io as mio
from bytemamba.models.io import CheckpointError, load_model, save_model
from bytemamba.models.lm import ByteMambaLM


def tiny(seed=0, **kw) -> ByteMambaLM:
    torch.manual_seed(seed)
    return ByteMambaLM(ModelConfig(d_model=16, n_layer=2, d_state=4, scan_backend="torch", **kw)).eval()


X = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_identical_logits(tmp_path, tie):
    m = tiny(tie_embeddings=tie)
    save_model(m, tmp_path / "m", extra={"data": {"kind": "text"}})
    m2, meta = load_model(tmp_path / "m")
    assert meta["data"] == {"kind": "text"} and meta["format"] == "bytemamba"
    assert m2.config == m.config
    with torch.no_grad():
        torch.testing.assert_close(m2(X), m(X), rtol=0, atol=0)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v, rtol=0, atol=0)
    assert not m2.training


def test_tied_weights_retied_after_load_and_stored_once(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == len(set(keys))
    assert ("lm_head.weight" in keys) != ("backbone.embedding.weight" in keys)   # exactly one of the pair
    assert len(keys) == len(m.state_dict()) - 1
    m2 = ByteMambaLM.from_pretrained(tmp_path / "m")
    assert m2.lm_head.weight is m2.backbone.embedding.weight
    assert m2.lm_head.weight.data_ptr() == m2.backbone.embedding.weight.data_ptr()
    # training the loaded model keeps them tied
    opt = torch.optim.SGD(m2.parameters(), lr=1.0)
    m2(X).sum().backward()
    opt.step()
    assert torch.equal(m2.lm_head.weight, m2.backbone.embedding.weight)


@pytest.mark.parametrize("keep", ["lm_head.weight", "both"])
def test_tied_model_loads_files_with_either_or_both_names(tmp_path, keep):
    """A weights file written by other tools may keep lm_head.weight, or both names (as public Mamba
    checkpoints do); the tied model loads either, with one shared tensor."""
    m = tiny()
    save_model(m, tmp_path / "m")
    drop = {"backbone.embedding.weight"} if keep == "lm_head.weight" else set()
    sd = {k: v.clone().contiguous() for k, v in m.state_dict().items() if k not in drop}
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    m2, _ = load_model(tmp_path / "m")
    assert m2.lm_head.weight is m2.backbone.embedding.weight
    with torch.no_grad():
        torch.testing.assert_close(m2(X), m(X), rtol=0, atol=0)


def test_tied_model_with_different_head_and_embedding_is_refused(tmp_path):
    m = tiny()
    save_model(m, tmp_path / "m")
    sd = {k: v.clone().contiguous() for k, v in m.state_dict().items()}
    sd["lm_head.weight"] += 1.0
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_model(tmp_path / "m")


def test_save_overwrites_existing_directory(tmp_path):
    save_model(tiny(0), tmp_path / "m")
    save_model(tiny(1), tmp_path / "m")
    m2, _ = load_model(tmp_path / "m")
    torch.testing.assert_close(m2(X), tiny(1)(X), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_saved_directory_has_ordinary_permissions(tmp_path):
    import os
    import stat
    umask = os.umask(0)
    os.umask(umask)
    save_model(tiny(), tmp_path / "m")
    mode = stat.S_IMODE((tmp_path / "m").stat().st_mode)
    assert mode == 0o777 & ~umask                # as a plain mkdir would give, not mkdtemp's 0700


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")


def test_missing_config(tmp_path):
    save_model(tiny(), tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "m")


def test_missing_weights(tmp_path):
    save_model(tiny(), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_weights(tmp_path, damage):
    save_model(tiny(), tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    raw = w.read_bytes()
    w.write_bytes({"garbage": b"not a safetensors file at all" * 10, "truncated": raw[: len(raw) // 2],
                   "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "m")


def test_invalid_config_json(tmp_path):
    save_model(tiny(), tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "m")


def test_config_without_format_is_refused(tmp_path):
    save_model(tiny(), tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"d_model": 16}))
    with pytest.raises(CheckpointError, match="not a bytemamba model config"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("key, value, message", [
    ("d_model", 24, r"backbone\.[\w.]+ has shape"),                      # a tensor of the wrong shape
    ("n_layer", 3, r"tensor backbone\.layers\.2\.[\w.]+ is missing"),    # a layer the file lacks
])
def test_config_weights_mismatch_names_tensor(tmp_path, key, value, message):
    save_model(tiny(), tmp_path / "m")
    cf = tmp_path / "m" / "config.json"
    meta = json.loads(cf.read_text())
    meta["model"][key] = value
    cf.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "m")


def test_unexpected_tensor_is_named(tmp_path):
    m = tiny()
    save_model(m, tmp_path / "m")
    sd = {k: v.clone() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    sd["backbone.extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="backbone.extra.weight"):
        load_model(tmp_path / "m")


def test_unknown_model_key_in_config(tmp_path):
    save_model(tiny(), tmp_path / "m")
    cf = tmp_path / "m" / "config.json"
    meta = json.loads(cf.read_text())
    meta["model"]["n_heads"] = 4
    cf.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="n_heads"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("model_cfg,needle", [
    ("x", "not a bytemamba model config"),
    ([16], "not a bytemamba model config"),
    ({"d_model": -5}, "model.d_model"),
    ({"d_model": 16, "n_layer": 2, "d_state": 4, "scan_backend": "nope"}, "model.scan_backend"),
    ({"d_model": "wide"}, "d_model"),
])
def test_invalid_model_section_is_a_checkpoint_error(tmp_path, model_cfg, needle):
    save_model(tiny(), tmp_path / "m")
    cf = tmp_path / "m" / "config.json"
    meta = json.loads(cf.read_text())
    meta["model"] = model_cfg
    cf.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=needle):
        load_model(tmp_path / "m")


def test_checkpoint_errors_are_user_errors():
    assert issubclass(CheckpointError, UserError)


def test_atomic_write_leaves_nothing_when_saving_fails(tmp_path, monkeypatch):
    def boom(model, filename, *a, **k):
        with open(filename, "wb") as f:        # a half-written file, then the crash
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mio, "st_save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny(), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_failure_keeps_the_previous_directory(tmp_path, monkeypatch):
    save_model(tiny(0), tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mio, "st_save_model", boom)
    with pytest.raises(OSError):
        save_model(tiny(1), tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
