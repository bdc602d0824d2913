"""Exported model directories: `model.safetensors` + `config.json`. Nothing is ever unpickled.

config.json = {"format": "bytemamba", "format_version": 1, "model": {ModelConfig fields}, ...extra}
where `extra` carries what the writer knows beyond the model (the symbol stream: text or audio and its
rate and quantizer; the training step ...). Directories are written under a temporary name and renamed,
so a crash never leaves a half-written directory that looks whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_model as st_save_model

from bytemamba.errors import UserError
from bytemamba.config import Config, ConfigError, ModelConfig, section_from_dict, validate

FORMAT = "bytemamba"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint directory that is missing, incomplete, corrupt or does not match its config."""


def atomic_dir(final: Path):
    """Context manager: yields a temporary sibling directory, renamed onto `final` on success."""

    class _Atomic:
        def __enter__(self):
            final.parent.mkdir(parents=True, exist_ok=True)
            # mkdir (not mkdtemp, whose 0700 would stick to the renamed directory) honours the umask
            self.tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.tmp.mkdir()
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            old = None
            if final.exists():
                old = final.parent / f".{final.name}.old-{os.getpid()}"
                final.rename(old)
            self.tmp.rename(final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return False

    return _Atomic()


def save_model(model, path, extra: dict | None = None) -> Path:
    """Write `model` (a ByteMambaLM) to the directory `path`, atomically."""
    final = Path(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "model": dataclasses.asdict(model.config), **(extra or {})}
    with atomic_dir(final) as tmp:
        # save_model (not save_file) de-duplicates the tied embedding / lm_head pair
        st_save_model(model, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return final


def read_config(path) -> dict:
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {d}")
    cfg_file = d / CONFIG
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint {d} is missing {CONFIG}")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{cfg_file} is not a bytemamba model config "
                              f"(for a public Mamba checkpoint, run `bytemamba convert` first)")
    return meta


def _check_weights(model, wfile: Path) -> None:
    """Compare names and shapes in the file with the model's, naming the first disagreement."""
    try:
        with safe_open(str(wfile), framework="pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wfile} is not a readable safetensors file: {e}") from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = {"lm_head.weight", "backbone.embedding.weight"} if model.config.tie_embeddings else set()
    for k, shape in want.items():
        if k not in have:
            if k in tied and (tied - {k}) & have.keys():
                continue
            raise CheckpointError(f"{wfile} does not match its config: tensor {k} is missing")
        if have[k] != shape:
            raise CheckpointError(f"{wfile} does not match its config: {k} has shape {have[k]}, "
                                  f"config implies {shape}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise CheckpointError(f"{wfile} does not match its config: unexpected tensor {extra[0]}")


def load_model(path, device="cpu"):
    """Load an exported directory. Returns (ByteMambaLM, meta dict). Raises CheckpointError."""
    from bytemamba.models.lm import ByteMambaLM

    d = Path(path)
    meta = read_config(d)
    wfile = d / WEIGHTS
    if not wfile.is_file():
        raise CheckpointError(f"checkpoint {d} is missing {WEIGHTS}")
    try:
        cfg = section_from_dict(ModelConfig, meta["model"], f"{d / CONFIG} [model]")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    try:
        validate(Config(model=cfg))          # values too (d_model > 0, a known scan backend, ...)
    except ConfigError as e:
        raise CheckpointError(f"{d / CONFIG}: {e}") from None
    model = ByteMambaLM(cfg)
    _check_weights(model, wfile)
    try:
        state = st_load_file(str(wfile), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wfile} is not a readable safetensors file: {e}") from None
    if cfg.tie_embeddings:
        # the file may hold either name of the tied pair, or both (public layouts): one tensor either way
        emb, head = "backbone.embedding.weight", "lm_head.weight"
        if emb in state and head in state and not torch.equal(state[emb], state[head]):
            raise CheckpointError(f"{wfile}: model.tie_embeddings is set, but {head} differs from {emb}")
        state[emb] = state[head] = state[emb] if emb in state else state[head]
    model.load_state_dict(state, strict=True)
    model.to(device)
    if cfg.tie_embeddings:  # re-tie: loading by name may have left two separate tensors
        model.lm_head.weight = model.backbone.embedding.weight
    model.eval()
    return model, meta
