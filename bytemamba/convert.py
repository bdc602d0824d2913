"""`bytemamba convert SRC DST`: a public Mamba LM checkpoint -> a bytemamba model directory.

SRC is a directory as released for the state-spaces mamba models and the MambaByte PG19 / Stories / Books /
Code models: `config.json` (MambaConfig: d_model, n_layer, vocab_size, ssm_cfg, rms_norm, residual_in_fp32,
fused_add_norm, pad_vocab_size_multiple, tie_embeddings, ...) and `pytorch_model.bin` (a pickled state dict of
`MambaLMHeadModel`). The parameter names are already ours, so conversion is: read the config and refuse what
our model cannot represent, read the tensors without running any pickled code, drop vocabulary padding,
check every name and shape, write `model.safetensors` + `config.json` atomically.

Pickles are read with `torch.load(..., weights_only=True)` and nothing else; a file that holds anything but
a flat mapping of names to tensors is refused, naming the file and what was found.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import torch

from bytemamba.config import DataConfig, ModelConfig
from bytemamba.models.io import CONFIG, CheckpointError

SOURCE_WEIGHTS = ("pytorch_model.bin", "model.safetensors")

# ssm_cfg keys we map onto ModelConfig
SSM_MAP = {"d_state": "d_state", "d_conv": "d_conv", "expand": "expand", "dt_rank": "dt_rank",
           "dt_min": "dt_min", "dt_max": "dt_max", "dt_init_floor": "dt_init_floor", "conv_bias": "conv_bias",
           "bias": "bias"}
# ssm_cfg keys that only affect initialisation or which kernel runs
SSM_IGNORED = {"dt_init", "dt_scale", "use_fast_path", "layer_idx", "device", "dtype"}


def _refuse(src: Path, msg: str):
    raise CheckpointError(f"cannot convert {src}: {msg}")


def map_config(raw: dict, src: Path) -> tuple[ModelConfig, int]:
    """MambaConfig dict -> (ModelConfig, rows of the stored embedding). Refuses what we cannot represent."""
    if "hidden_size" in raw and "d_model" not in raw:
        _refuse(src, f"{CONFIG} is a transformers MambaConfig (hidden_size, num_hidden_layers ...); convert "
                     f"the original state-spaces release (d_model, n_layer, ssm_cfg ...) instead")
    for key in ("d_model", "n_layer", "vocab_size"):
        if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool) or raw[key] <= 0:
            _refuse(src, f"{CONFIG} has no positive integer {key!r}")
    if raw.get("rms_norm", True) is not True:
        _refuse(src, "rms_norm is false (LayerNorm blocks); bytemamba models use RMSNorm only")
    if raw.get("attn_layer_idx"):
        _refuse(src, f"it has attention layers (attn_layer_idx={raw['attn_layer_idx']}); "
                     f"bytemamba models are pure Mamba stacks")
    if raw.get("d_intermediate", 0):
        _refuse(src, f"it has an MLP after each mixer (d_intermediate={raw['d_intermediate']}); "
                     f"bytemamba blocks have none")
    ssm = raw.get("ssm_cfg") or {}
    if not isinstance(ssm, dict):
        _refuse(src, f"ssm_cfg should be a mapping, got {ssm!r}")
    layer = ssm.get("layer", "Mamba1")
    if layer != "Mamba1":
        _refuse(src, f"ssm_cfg.layer is {layer!r}; only Mamba-1 (selective scan S6) layers are supported")
    unknown = sorted(set(ssm) - set(SSM_MAP) - SSM_IGNORED - {"layer"})
    if unknown:
        _refuse(src, f"ssm_cfg.{unknown[0]} is not understood (known: {', '.join(sorted(SSM_MAP))})")
    vocab = raw["vocab_size"]
    if vocab != 256:
        _refuse(src, f"vocab_size is {vocab}; bytemamba models have exactly 256 symbols (bytes)")
    mult = raw.get("pad_vocab_size_multiple", 1) or 1
    rows = vocab if vocab % mult == 0 else vocab + mult - vocab % mult

    cfg = ModelConfig(d_model=raw["d_model"], n_layer=raw["n_layer"], vocab_size=256,
                      tie_embeddings=bool(raw.get("tie_embeddings", True)))
    if "norm_epsilon" in raw:
        cfg.rms_norm_eps = float(raw["norm_epsilon"])
    for k, ours in SSM_MAP.items():
        if k not in ssm:
            continue
        v = ssm[k]
        if k == "dt_rank":
            if v == "auto":
                v = 0
            elif not isinstance(v, int) or v <= 0:
                _refuse(src, f"ssm_cfg.dt_rank must be 'auto' or a positive integer, got {v!r}")
        setattr(cfg, ours, type(getattr(cfg, ours))(v))
    return cfg, rows


def _load_tensors(wfile: Path) -> dict[str, torch.Tensor]:
    """Plain tensors by name, from a pickle (weights_only) or safetensors file; anything else is refused."""
    if wfile.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(wfile))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{wfile} is not a readable safetensors file: {e}") from None
    try:
        obj = torch.load(wfile, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        import re
        found = re.search(r"GLOBAL (\S+)", str(e))
        why = f"it needs {found.group(1)}" if found else str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"{wfile} holds objects other than tensors, refused without unpickling them "
                              f"({why})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{wfile} is not a readable PyTorch checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{wfile} holds a {type(obj).__name__}, not a mapping of names to tensors")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{wfile} holds {type(v).__name__} under {k!r}, not a tensor; "
                                  f"only plain state dicts of tensors are converted")
    return obj


def convert(src, dst) -> dict:
    """Convert SRC (public Mamba LM directory) into DST (bytemamba model directory). Returns a summary."""
    from bytemamba.models.lm import ByteMambaLM
    from bytemamba.models.io import save_model

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a directory (expected config.json + pytorch_model.bin)")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst} already exists; choose a new output directory")
    cfile = src / CONFIG
    if not cfile.is_file():
        _refuse(src, f"{CONFIG} is missing")
    try:
        raw = json.loads(cfile.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfile} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        _refuse(src, f"{CONFIG} is not a JSON object")
    if raw.get("format") == "bytemamba":
        _refuse(src, "it is already a bytemamba model directory")
    wfile = next((src / n for n in SOURCE_WEIGHTS if (src / n).is_file()), None)
    if wfile is None:
        _refuse(src, f"found none of {', '.join(SOURCE_WEIGHTS)}")
    cfg, rows = map_config(raw, src)
    sd = _load_tensors(wfile)

    emb = sd.get("backbone.embedding.weight")
    if emb is None:
        raise CheckpointError(f"{wfile} has no backbone.embedding.weight (is this a MambaLMHeadModel?)")
    if emb.shape != (rows, cfg.d_model):
        raise CheckpointError(f"{wfile}: backbone.embedding.weight has shape {tuple(emb.shape)}; config.json "
                              f"implies ({rows}, {cfg.d_model}) (vocab 256 padded to a multiple of "
                              f"{raw.get('pad_vocab_size_multiple', 1)})")
    head = sd.get("lm_head.weight")
    if head is not None and head.shape != emb.shape:
        raise CheckpointError(f"{wfile}: lm_head.weight has shape {tuple(head.shape)}, "
                              f"the embedding {tuple(emb.shape)}")
    if cfg.tie_embeddings and head is not None and not torch.equal(head, emb):
        raise CheckpointError(f"{wfile}: tie_embeddings is true but lm_head.weight differs from the embedding")
    if rows > 256:                                   # vocabulary padding: rows no symbol can ever select
        sd["backbone.embedding.weight"] = emb[:256]
        if head is not None:
            sd["lm_head.weight"] = head[:256]
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)

    model = ByteMambaLM(cfg)
    want = model.state_dict()
    if cfg.tie_embeddings:
        want.pop("lm_head.weight")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise CheckpointError(f"{wfile} has a tensor bytemamba does not know: {extra[0]} "
                              f"({len(extra)} unexpected in all)")
    for k, v in want.items():
        if k not in sd:
            raise CheckpointError(f"{wfile} is missing {k}")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{wfile}: {k} has shape {tuple(sd[k].shape)}, config.json implies "
                                  f"{tuple(v.shape)}")
        if not sd[k].is_floating_point():
            raise CheckpointError(f"{wfile}: {k} is {sd[k].dtype}, expected floating point")
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
    with torch.no_grad():
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    meta = {"data": dataclasses.asdict(DataConfig()),
            "converted_from": {"path": str(src.resolve()), "weights": wfile.name, "dtype": dtypes,
                               "config": raw}}
    save_model(model, dst, meta)
    n = model.num_parameters()
    return {"dst": str(dst), "params": n, "config": cfg, "padding_rows_dropped": max(0, rows - 256),
            "source_dtype": dtypes}


def describe(summary: dict) -> str:
    cfg = summary["config"]
    pad = f"; dropped {summary['padding_rows_dropped']} padding rows of the vocabulary" \
        if summary["padding_rows_dropped"] else ""
    return (f"converted: {summary['dst']} ({summary['params'] / 1e6:.2f}M parameters, {cfg.n_layer} layers x "
            f"d_model {cfg.d_model}, d_state {cfg.d_state}, tied head {cfg.tie_embeddings}; source "
            f"{'/'.join(summary['source_dtype'])}, stored as float32{pad})")
