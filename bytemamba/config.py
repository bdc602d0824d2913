"""Typed configuration: one dataclass per concern, read from a TOML recipe plus `section.key=value` overrides.

A recipe is a TOML file whose tables are the sections below ([model], [data], [optim], [train], ...).
Every component is built from its own section only (the model never sees [train], the data never
sees [optim]). Unknown sections or keys and values of the wrong type are errors that name the key.
The resolved configuration is written back as TOML with every run (`to_toml`).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from bytemamba.errors import UserError


class ConfigError(UserError, ValueError):
    """A recipe or override that does not fit the schema; the message names the key."""


@dataclass
class ModelConfig:
    d_model: int = 128
    n_layer: int = 4
    vocab_size: int = 256            # 256 symbols: bytes, or 8-bit audio codes
    d_state: int = 16                # N, the SSM state size per channel
    d_conv: int = 4                  # depthwise causal conv kernel
    expand: int = 2                  # d_inner = expand * d_model
    dt_rank: int = 0                 # 0 = ceil(d_model / 16), as in Mamba
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False               # biases on in_proj / out_proj
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    scan_backend: str = "auto"       # auto | torch | cuda | ref

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        return self.dt_rank if self.dt_rank > 0 else math.ceil(self.d_model / 16)


@dataclass
class DataConfig:
    kind: str = "text"               # text | audio
    path: str = ""                   # file or folder of files; "" = the embedded default corpus
    val_fraction: float = 0.05       # share of files (or bytes, for a single file) held out
    doc_boundaries: bool = True      # mark file starts as `reset` so packed windows never leak
    pattern: str = "*"               # glob for files inside a folder ("*.py", "*.txt", ...)


@dataclass
class AudioConfig:
    sample_rate: int = 16000
    quantizer: str = "mulaw8"        # mulaw8 | linear8 | pcm16
    normalize: bool = False          # per-clip peak normalisation before quantizing
    window: str = "random"           # random (long recordings) | clip (clip-aligned, short clips)
    clip_start_fraction: float = 0.0  # share of training windows that begin exactly at a clip start
    cache_dir: str = ""              # "" = ~/.cache/bytemamba/audio
    synth_seconds: float = 240.0     # size of the embedded procedural corpus
    synth_seed: int = 0
    val_path: str = ""               # held-out audio (folder, list or file); "" = hash split of data.path


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1        # not applied to A_log, D, norms, biases, embedding
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    max_steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    out_dir: str = "runs/text_default"
    device: str = "auto"             # auto | cpu | cuda
    mixed_precision: str = "auto"    # auto (bf16 on GPU, none on CPU) | no | bf16 | fp16
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep_checkpoints: int = 3
    trackers: str = "auto"           # auto (tensorboard when installed) | none | tensorboard
    sample_bytes: int = 200          # sample printed at the end of a run (0 = none)
    max_bad_steps: int = 10          # NaN/inf losses in a row before the run aborts
    halt_at: int = 0                 # stop at this step (checkpoint saved, schedule unchanged), as if
                                     # preempted; `--resume` continues. 0 = run to max_steps


@dataclass
class GenerateConfig:
    prompt: str = "def "
    max_bytes: int = 200
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_class(name: str):
    hints = typing.get_type_hints(Config)
    return hints[name]


def _coerce(value, typ, key: str):
    """Coerce a TOML value or a command-line string to the field's declared type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {typ}")


def _apply(cfg: Config, section: str, key: str, value, source: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
    sec = getattr(cfg, section)
    hints = typing.get_type_hints(type(sec))
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {section}.{key} "
                          f"(known: {', '.join(hints)})")
    setattr(sec, key, _coerce(value, hints[key], f"{section}.{key}"))


def parse_overrides(items: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        out.append((section.strip(), key.strip(), value))
    return out


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- recipe TOML <- overrides, each checked against the schema."""
    cfg = Config()
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"recipe {path} is not valid TOML: {e}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table")
            for key, value in table.items():
                _apply(cfg, section, key, value, str(path))
    for section, key, value in parse_overrides(overrides or []):
        _apply(cfg, section, key, value, "override")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express; each names its key."""
    checks = [
        (cfg.model.d_model > 0, "model.d_model must be positive"),
        (cfg.model.n_layer > 0, "model.n_layer must be positive"),
        (cfg.model.vocab_size == 256, "model.vocab_size must be 256 (a byte alphabet)"),
        (1 <= cfg.model.d_state <= 256, "model.d_state must be in 1..256"),
        (cfg.model.d_conv >= 1, "model.d_conv must be at least 1"),
        (cfg.model.scan_backend in ("auto", "torch", "cuda", "ref"),
         "model.scan_backend must be auto, torch, cuda or ref"),
        (cfg.data.kind in ("text", "audio"), "data.kind must be text or audio"),
        (0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)"),
        (cfg.audio.quantizer in ("mulaw8", "linear8", "pcm16"),
         "audio.quantizer must be mulaw8, linear8 or pcm16"),
        (cfg.audio.window in ("random", "clip"), "audio.window must be random or clip"),
        (0.0 <= cfg.audio.clip_start_fraction <= 1.0, "audio.clip_start_fraction must be in [0, 1]"),
        (1000 <= cfg.audio.sample_rate <= 192000, "audio.sample_rate must be in 1000..192000 Hz"),
        (cfg.audio.synth_seconds > 0, "audio.synth_seconds must be positive"),
        (not (cfg.data.kind == "audio" and cfg.audio.quantizer == "pcm16" and cfg.train.seq_len % 2),
         "train.seq_len must be even for audio.quantizer=pcm16 (two symbols per sample)"),
        (cfg.optim.lr > 0, "optim.lr must be positive"),
        (cfg.train.max_steps >= 0, "train.max_steps must be >= 0"),
        (cfg.train.batch_size > 0, "train.batch_size must be positive"),
        (cfg.train.seq_len > 0, "train.seq_len must be positive"),
        (cfg.train.grad_accum > 0, "train.grad_accum must be positive"),
        (cfg.train.device in ("auto", "cpu", "cuda"), "train.device must be auto, cpu or cuda"),
        (cfg.train.mixed_precision in ("auto", "no", "bf16", "fp16"),
         "train.mixed_precision must be auto, no, bf16 or fp16"),
        (cfg.train.trackers in ("auto", "none", "tensorboard"),
         "train.trackers must be auto, none or tensorboard"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be at least 1"),
        (cfg.train.log_every >= 1, "train.log_every must be at least 1"),
        (cfg.train.eval_every >= 1, "train.eval_every must be at least 1"),
        (cfg.train.save_every >= 1, "train.save_every must be at least 1"),
        (cfg.train.eval_batches >= 1, "train.eval_batches must be at least 1"),
        (cfg.train.halt_at >= 0, "train.halt_at must be >= 0"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (cfg.generate.top_k >= 0, "generate.top_k must be >= 0"),
        (cfg.generate.temperature >= 0, "generate.temperature must be >= 0"),
        (0.0 < cfg.generate.top_p <= 1.0, "generate.top_p must be in (0, 1]"),
        (0.0 <= cfg.generate.min_p < 1.0, "generate.min_p must be in [0, 1)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def section_from_dict(cls, data: dict, source: str):
    """Build one section dataclass from a plain dict (e.g. a checkpoint's config.json)."""
    hints = typing.get_type_hints(cls)
    obj = cls()
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"{source}: unknown key {key!r}")
        setattr(obj, key, _coerce(value, hints[key], key))
    return obj


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # TOML basic strings may not hold raw control characters: escape every one of them
        esc = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}
        return '"' + "".join(esc.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                             for c in v) + '"'
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: Config) -> str:
    lines = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for k, v in dataclasses.asdict(getattr(cfg, section)).items():
            if v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)
