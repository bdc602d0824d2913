"""`bytemamba info PATH`: what a checkpoint holds, without loading the weights.

PATH may be an exported model directory (model.safetensors + config.json), a training checkpoint
(OUT/checkpoints/checkpoint_K, verified against its manifest) or a run directory (OUT: its exported model,
if any, and its checkpoints). Parameter counts come from the safetensors header (shapes only).
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

from bytemamba.checkpoint import CKPT_SUBDIR, MANIFEST, list_checkpoints, verify
from bytemamba.models.io import CONFIG, WEIGHTS, CheckpointError, read_config


def count_parameters(wfile: Path) -> int:
    """Elements stored in a safetensors file (a tied head is stored once), read from the header only."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(wfile), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wfile} is not a readable safetensors file: {e}") from None


def _model_line(m: dict) -> str:
    dt = m.get("dt_rank", 0)
    dt_s = f"{dt}" if dt else f"{math.ceil(m.get('d_model', 0) / 16)} (auto)"
    return (f"d_model {m.get('d_model')}, n_layer {m.get('n_layer')}, d_state {m.get('d_state')}, "
            f"d_conv {m.get('d_conv')}, expand {m.get('expand')}, dt_rank {dt_s}, "
            f"{'tied' if m.get('tie_embeddings', True) else 'separate'} embedding/head, "
            f"scan backend {m.get('scan_backend', 'auto')}")


def _unit(kind: str) -> str:
    return "byte" if kind == "text" else "symbol"


def _seen(symbols, unit: str, train_symbols=None) -> str:
    if symbols is None:
        return "unknown"
    s = f"{symbols:,} {unit}s"
    if train_symbols:
        s += f" ({symbols / train_symbols:.2f} passes over {train_symbols:,} training {unit}s)"
    return s


def _val(v, unit: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "none yet"
    return f"{v:.4f} bits per {unit}"


def info_model(d: Path) -> dict:
    meta = read_config(d)
    wfile = d / WEIGHTS
    if not wfile.is_file():
        raise CheckpointError(f"checkpoint {d} is missing {WEIGHTS}")
    kind = meta.get("data", {}).get("kind", "text")
    tr = meta.get("training", {})
    return {"kind": "model", "path": str(d), "parameters": count_parameters(wfile), "model": meta["model"],
            "data": meta.get("data", {}), "audio": meta.get("audio") if kind == "audio" else None,
            "step": tr.get("step"), "symbols_seen": tr.get("symbols_seen"),
            "train_symbols": tr.get("train_symbols"), "val_bits_per_symbol": tr.get("val_bits_per_symbol"),
            "bad_steps": tr.get("bad_steps"), "converted_from": meta.get("converted_from", {}).get("path")}


def _run_config(run_dir: Path) -> dict:
    try:
        return tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def info_checkpoint(d: Path) -> dict:
    m = verify(d)                                    # refuses a damaged checkpoint, naming the file
    run = _run_config(d.parent.parent)
    wfile = d / "model.safetensors"
    params = count_parameters(wfile) if wfile.is_file() else None
    return {"kind": "checkpoint", "path": str(d), "parameters": params, "model": m.get("model", run.get("model", {})),
            "data": run.get("data", {}), "step": m.get("step"), "symbols_seen": m.get("symbols_seen"),
            "train_symbols": None, "val_bits_per_symbol": m.get("last_val_bits_per_symbol"),
            "bad_steps": m.get("bad_steps"), "world_size": m.get("world_size"), "written": m.get("written"),
            "verified": True}


def info(path) -> dict:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if (p / CONFIG).is_file():
        return info_model(p)
    if (p / MANIFEST).is_file():
        return info_checkpoint(p)
    if (p / CKPT_SUBDIR).is_dir() or (p / "model" / CONFIG).is_file():
        out = {"kind": "run", "path": str(p), "model_dir": None, "checkpoints": []}
        if (p / "model" / CONFIG).is_file():
            out["model_dir"] = info_model(p / "model")
        good, bad = list_checkpoints(p / CKPT_SUBDIR)
        for d, m in good:
            try:
                verify(d)
                ok = "verified"
            except CheckpointError as e:
                ok = f"DAMAGED: {e}"
            out["checkpoints"].append({"path": str(d), "step": m.get("step"), "status": ok,
                                       "val_bits_per_symbol": m.get("last_val_bits_per_symbol"),
                                       "symbols_seen": m.get("symbols_seen"), "model": m.get("model")})
        for d, msg in bad:
            out["checkpoints"].append({"path": str(d), "step": None, "status": f"UNREADABLE: {msg}"})
        out["data"] = _run_config(p).get("data", {})
        return out
    raise CheckpointError(f"{p} is not a bytemamba model directory, training checkpoint or run directory "
                          f"(no {CONFIG}, {MANIFEST} or {CKPT_SUBDIR}/)")


def format_info(r: dict) -> str:
    if r["kind"] == "run":
        lines = [f"run directory: {r['path']}"]
        unit = _unit(r.get("data", {}).get("kind", "text"))
        if r["model_dir"]:
            lines += ["exported model:"] + ["  " + x for x in format_info(r["model_dir"]).splitlines()]
        else:
            lines.append("exported model: none yet (the run has not finished)")
        lines.append(f"checkpoints: {len(r['checkpoints'])}" + (" (newest first)" if r["checkpoints"] else ""))
        for c in r["checkpoints"]:
            step = "?" if c["step"] is None else c["step"]
            lines.append(f"  {Path(c['path']).name}: step {step}, data seen "
                         f"{_seen(c.get('symbols_seen'), unit)}, validation "
                         f"{_val(c.get('val_bits_per_symbol'), unit)} [{c['status']}]")
        return "\n".join(lines)
    unit = _unit((r.get("data") or {}).get("kind", "text"))
    title = "bytemamba model" if r["kind"] == "model" else "training checkpoint (verified against its manifest)"
    n = r.get("parameters")
    lines = [f"{title}: {r['path']}",
             f"parameters: {'unknown' if n is None else f'{n:,} ({n / 1e6:.2f}M)'}",
             f"model: {_model_line(r['model'])}"]
    data = r.get("data") or {}
    if data and r.get("converted_from"):
        lines.append(f"data: {data.get('kind', 'text')} (trained elsewhere)")
    elif data:
        src = data.get("path") or "(embedded default corpus)"
        lines.append(f"data: {data.get('kind', 'text')}, {src}")
    if r.get("audio"):
        a = r["audio"]
        lines.append(f"audio: {a.get('sample_rate')} Hz, {a.get('quantizer')}")
    if r.get("converted_from"):
        lines.append(f"converted from: {r['converted_from']}")
    lines.append(f"training step: {'unknown' if r.get('step') is None else r['step']}")
    lines.append(f"data seen: {_seen(r.get('symbols_seen'), unit, r.get('train_symbols'))}")
    lines.append(f"last validation: {_val(r.get('val_bits_per_symbol'), unit)}")
    if r.get("bad_steps"):
        lines.append(f"skipped steps (non-finite loss): {r['bad_steps']}")
    if r.get("world_size"):
        lines.append(f"written by {r['world_size']} process(es) at {r.get('written')}")
    return "\n".join(lines)


def to_json(r: dict) -> str:
    def clean(x):
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(r), indent=2)
