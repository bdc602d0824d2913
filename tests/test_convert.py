"""`bytemamba convert`: public Mamba LM checkpoints (config.json + pytorch_model.bin) -> safetensors.

Public checkpoints cannot be downloaded here, so each test builds one in exactly the released layout
(MambaLMHeadModel key names, MambaConfig keys, the head tied to the embedding and saved as one storage,
vocabulary padded to pad_vocab_size_multiple), with tensors drawn independently of our model code. The
logits of the converted model are checked against (a) the source tensors loaded straight into our model,
exactly, and (b) an independent float64 re-implementation of the Mamba-1 LM forward written below.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bytemamba.cli import main
from bytemamba.config import ModelConfig
from bytemamba.convert import convert
from bytemamba.errors import UserError
from bytemamba.models.io import load_model
from bytemamba.models.lm import ByteMambaLM

D_MODEL, N_LAYER, D_STATE, D_CONV, EXPAND = 32, 2, 8, 4, 2


def public_config(**kw) -> dict:
    cfg = {"d_model": D_MODEL, "n_layer": N_LAYER, "vocab_size": 256,
           "ssm_cfg": {"d_state": D_STATE, "d_conv": D_CONV, "expand": EXPAND},
           "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
           "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    cfg.update(kw)
    return cfg


def public_state_dict(rows: int, seed: int = 0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    e, n, r = EXPAND * D_MODEL, D_STATE, math.ceil(D_MODEL / 16)

    def rnd(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    sd = {"backbone.embedding.weight": rnd(rows, D_MODEL, scale=0.5)}
    for i in range(N_LAYER):
        p = f"backbone.layers.{i}."
        sd.update({
            p + "mixer.in_proj.weight": rnd(2 * e, D_MODEL),
            p + "mixer.conv1d.weight": rnd(e, 1, D_CONV, scale=0.4),
            p + "mixer.conv1d.bias": rnd(e),
            p + "mixer.x_proj.weight": rnd(r + 2 * n, e),
            p + "mixer.dt_proj.weight": rnd(e, r),
            p + "mixer.dt_proj.bias": rnd(e, scale=1.0) - 3.0,
            p + "mixer.A_log": (torch.log(torch.arange(1, n + 1).float()).repeat(e, 1)
                                + rnd(e, n, scale=0.1).float()).to(dtype),
            p + "mixer.D": 1 + rnd(e),
            p + "mixer.out_proj.weight": rnd(D_MODEL, e),
            p + "norm.weight": 1 + rnd(D_MODEL),
        })
    sd["backbone.norm_f.weight"] = 1 + rnd(D_MODEL)
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]          # tied: one storage, two names
    return sd


def write_public(d: Path, cfg: dict, sd: dict) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    torch.save(sd, d / "pytorch_model.bin")
    return d


def reference_logits(sd: dict, ids: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mamba-1 LM forward, float64, straight from the paper / the public reference code's equations."""
    sd = {k: v.double() for k, v in sd.items()}

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    h, residual = sd["backbone.embedding.weight"][ids], None       # (b, l, d)
    b, l = ids.shape
    for i in range(N_LAYER):
        p = f"backbone.layers.{i}.mixer."
        residual = h if residual is None else residual + h
        x = rms(residual, sd[f"backbone.layers.{i}.norm.weight"])
        x, z = (x @ sd[p + "in_proj.weight"].T).chunk(2, dim=-1)   # (b, l, e)
        e = x.shape[-1]
        x = F.conv1d(x.transpose(1, 2), sd[p + "conv1d.weight"], sd[p + "conv1d.bias"],
                     padding=D_CONV - 1, groups=e)[..., :l].transpose(1, 2)
        x = F.silu(x)
        dt, B, C = torch.split(x @ sd[p + "x_proj.weight"].T, [sd[p + "dt_proj.weight"].shape[1], D_STATE,
                                                                 D_STATE], dim=-1)
        dt = F.softplus(dt @ sd[p + "dt_proj.weight"].T + sd[p + "dt_proj.bias"])   # (b, l, e)
        A = -torch.exp(sd[p + "A_log"])                            # (e, n)
        s = torch.zeros(b, e, D_STATE, dtype=torch.float64)
        ys = []
        for t in range(l):
            s = torch.exp(dt[:, t, :, None] * A) * s + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
            ys.append((s * C[:, t, None, :]).sum(-1) + sd[p + "D"] * x[:, t])
        y = torch.stack(ys, dim=1) * F.silu(z)
        h = y @ sd[p + "out_proj.weight"].T
    residual = residual + h
    return rms(residual, sd["backbone.norm_f.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("pad_multiple,rows", [(8, 256), (96, 288)])
def test_convert_gives_identical_logits(tmp_path, pad_multiple, rows, capsys):
    sd = public_state_dict(rows)
    src = write_public(tmp_path / "mambabyte", public_config(pad_vocab_size_multiple=pad_multiple), sd)
    dst = tmp_path / "converted"
    assert main(["convert", str(src), str(dst)]) == 0
    said = capsys.readouterr().out
    assert "converted:" in said and (f"dropped {rows - 256} padding rows" in said) == (rows > 256)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]

    model, meta = load_model(dst)
    assert meta["model"]["d_state"] == D_STATE and meta["model"]["tie_embeddings"] is True
    assert meta["converted_from"]["config"]["pad_vocab_size_multiple"] == pad_multiple
    assert model.lm_head.weight is model.backbone.embedding.weight

    # (a) the source tensors run through our model
    direct = ByteMambaLM(ModelConfig(d_model=D_MODEL, n_layer=N_LAYER, d_state=D_STATE, d_conv=D_CONV,
                                     expand=EXPAND))
    src_sd = {k: (v[:256] if k in ("backbone.embedding.weight", "lm_head.weight") else v) for k, v in sd.items()}
    direct.load_state_dict(src_sd)
    direct.eval()
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(ids), direct(ids)
    assert torch.equal(got, want)
    # (b) an independent float64 Mamba-1 LM forward over the source checkpoint (its first 256 logits)
    ref = reference_logits(sd, ids)[..., :256]
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_half_precision_sources_become_float32(tmp_path):
    sd = public_state_dict(256, dtype=torch.bfloat16)
    src = write_public(tmp_path / "bf16", public_config(), sd)
    convert(src, tmp_path / "out")
    model, _ = load_model(tmp_path / "out")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(model.backbone.layers[1].mixer.A_log.data,
                               sd["backbone.layers.1.mixer.A_log"].float(), rtol=0, atol=0)


def test_loading_our_checkpoints_never_unpickles(tmp_path, monkeypatch):
    src = write_public(tmp_path / "src", public_config(), public_state_dict(256))
    convert(src, tmp_path / "out")

    def forbidden(*a, **k):
        raise AssertionError("unpickling while loading a bytemamba checkpoint")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    model, _ = load_model(tmp_path / "out")
    assert model.config.d_model == D_MODEL


class Payload:
    """Unpickling this would create a file: proof of code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _refused(capsys, src: Path, dst: Path, *needles: str) -> str:
    assert main(["convert", str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for n in needles:
        assert n in err[0], err[0]
    assert not dst.exists()                                          # nothing half-written
    return err[0]


def test_refuses_a_checkpoint_holding_a_non_tensor_object(tmp_path, capsys):
    marker = tmp_path / "pwned"
    sd = public_state_dict(256)
    sd["backbone.norm_f.extra"] = Payload(marker)
    src = write_public(tmp_path / "evil", public_config(), sd)
    _refused(capsys, src, tmp_path / "out", "pytorch_model.bin", "other than tensors")
    assert not marker.exists()                                       # the payload never ran

    sd = public_state_dict(256)
    sd["step"] = 1234                                                # allowed by weights_only, still not a tensor
    src2 = write_public(tmp_path / "with_int", public_config(), sd)
    _refused(capsys, src2, tmp_path / "out2", "pytorch_model.bin", "int under 'step'")


@pytest.mark.parametrize("change,needle", [
    ({"rms_norm": False}, "RMSNorm"),
    ({"ssm_cfg": {"layer": "Mamba2", "d_state": 64}}, "Mamba-1"),
    ({"attn_layer_idx": [1], "attn_cfg": {"num_heads": 4}}, "attention"),
    ({"d_intermediate": 128}, "d_intermediate"),
    ({"vocab_size": 260}, "256 symbols"),
    ({"ssm_cfg": {"d_state": D_STATE, "ngroups": 2}}, "ssm_cfg.ngroups"),
])
def test_refuses_what_it_cannot_represent(tmp_path, capsys, change, needle):
    src = write_public(tmp_path / "src", public_config(**change), public_state_dict(256))
    _refused(capsys, src, tmp_path / "out", needle)


def test_refuses_mismatched_or_incomplete_weights(tmp_path, capsys):
    sd = public_state_dict(256)
    del sd["backbone.layers.1.mixer.D"]
    _refused(capsys, write_public(tmp_path / "a", public_config(), sd), tmp_path / "oa",
             "missing backbone.layers.1.mixer.D")
    sd = public_state_dict(256)
    _refused(capsys, write_public(tmp_path / "b", public_config(ssm_cfg={"d_state": 16}), sd), tmp_path / "ob",
             "A_log has shape")
    sd = public_state_dict(256)
    sd["lm_head.weight"] = sd["lm_head.weight"].clone() + 1
    _refused(capsys, write_public(tmp_path / "c", public_config(), sd), tmp_path / "oc",
             "lm_head.weight differs")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps(public_config()))
    (tmp_path / "d" / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    _refused(capsys, tmp_path / "d", tmp_path / "od", "pytorch_model.bin")


def test_refuses_to_overwrite(tmp_path):
    src = write_public(tmp_path / "src", public_config(), public_state_dict(256))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        convert(src, tmp_path / "out")
