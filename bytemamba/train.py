"""The training loop, on HuggingFace Accelerate: one CPU, one GPU or many (`accelerate launch`).

    cfg -> streams (data) -> ByteMambaLM (model) -> AdamW + warmup/cosine -> Accelerate loop
        -> metrics.jsonl, trackers, checkpoints/ (Accelerate state), model/ (exported safetensors)

Everything a resumed run needs is in Accelerate's state (model, optimizer, RNG) plus `TrainState`
(step, checkpoints written, data seen), registered for checkpointing. Batches are a pure function of
(seed, step, micro-step, rank), so a resumed run sees the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from bytemamba.config import Config, OptimConfig, to_toml
from bytemamba.errors import UserError

LN2 = math.log(2.0)


class TrainState:
    """Counters that travel inside Accelerate checkpoints."""

    def __init__(self):
        self.step = 0            # optimizer steps completed
        self.saves = 0           # checkpoints written (Accelerate's save iteration)
        self.symbols_seen = 0    # training symbols consumed, all ranks
        self.bad_steps = 0       # non-finite losses skipped, in total
        self.last_val_bpb = float("nan")

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, d):
        for k, v in d.items():
            setattr(self, k, v)


# ---- optimisation ---------------------------------------------------------------------------------

def param_groups(model: torch.nn.Module, weight_decay: float):
    """AdamW groups: no decay on A_log, D, norms, biases and the (tied) embedding."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if (getattr(p, "_no_weight_decay", False) or p.ndim < 2 or "embedding" in name
                or "norm" in name):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, cfg: OptimConfig):
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warmup to cfg.lr, then cosine down to cfg.lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


# ---- accelerator ----------------------------------------------------------------------------------

def make_accelerator(cfg: Config, out_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    t = cfg.train
    if t.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda, but PyTorch sees no CUDA GPU (use train.device=cpu or auto)")
    cpu = t.device == "cpu" or not torch.cuda.is_available()
    mp = t.mixed_precision
    if mp == "auto":
        mp = "no" if cpu else "bf16"
    trackers = None
    if t.trackers in ("auto", "tensorboard"):
        try:
            import tensorboard  # noqa: F401
            trackers = "tensorboard"
        except ImportError:
            if t.trackers == "tensorboard":
                raise UserError("train.trackers=tensorboard, but tensorboard is not installed") from None
    project = ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs"),
                                   automatic_checkpoint_naming=True, total_limit=t.keep_checkpoints)
    return Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=t.grad_accum,
                       log_with=trackers, project_config=project)


def _flat(cfg: Config) -> dict:
    return {f"{s}.{k}": v for s, sec in asdict(cfg).items() for k, v in sec.items()}


# ---- evaluation -----------------------------------------------------------------------------------

@torch.no_grad()
def validate(model, sampler, accelerator, n_batches: int) -> float:
    """Mean NLL over a fixed set of validation windows, in bits per symbol, gathered over ranks."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for i in range(n_batches):
        b = {k: v.to(accelerator.device) for k, v in sampler.batch(step=i).items()}
        with accelerator.autocast():
            logits = model(b["input"], b.get("reset"))
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["target"].reshape(-1), reduction="sum")
        total += torch.stack([nll.double(), torch.tensor(b["target"].numel(), device=total.device,
                                                          dtype=torch.float64)])
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return float(total[0] / total[1]) / LN2


# ---- the loop -------------------------------------------------------------------------------------

def train(cfg: Config, resume: bool = False) -> dict:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from bytemamba.data import build_streams, make_sampler
    from bytemamba.models.lm import ByteMambaLM

    t = cfg.train
    unit = "byte" if cfg.data.kind == "text" else "symbol"
    out_dir = Path(t.out_dir)
    accelerator = make_accelerator(cfg, out_dir)
    main = accelerator.is_main_process
    set_seed(t.seed)                                          # same initial weights on every rank

    train_stream, val_stream = build_streams(cfg.data, cfg.audio)
    rank, world = accelerator.process_index, accelerator.num_processes
    sampler = make_sampler(train_stream, cfg, "train", rank, world)
    val_sampler = make_sampler(val_stream, cfg, "val", rank, world) if len(val_stream) > t.seq_len + 1 else None

    model = ByteMambaLM(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(to_toml(cfg))
    ckpt_dir = out_dir / "checkpoints"
    if resume:
        if not ckpt_dir.is_dir() or not any(ckpt_dir.iterdir()):
            raise UserError(f"--resume: no checkpoint under {ckpt_dir}")
        accelerator.load_state()                              # Accelerate picks the latest
        accelerator.project_configuration.iteration = state.saves
        if main:
            print(f"resumed from step {state.step} ({ckpt_dir})", flush=True)
    if accelerator.log_with:
        accelerator.init_trackers("bytemamba", config=_flat(cfg))

    n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    if main:
        print(f"model: {n_params / 1e6:.2f}M parameters, {cfg.model.n_layer} layers x d_model "
              f"{cfg.model.d_model}; data: {len(train_stream):,} train / {len(val_stream):,} val symbols; "
              f"device {accelerator.device} x{world}, precision {accelerator.mixed_precision}", flush=True)

    symbols_per_step = t.batch_size * t.seq_len * t.grad_accum * world
    metrics_path = out_dir / "metrics.jsonl"
    bar = tqdm(total=t.max_steps, initial=state.step, disable=not main, dynamic_ncols=True, unit="step")
    model.train()
    t0, window_loss, window_steps = time.perf_counter(), 0.0, 0
    last = {}

    while state.step < t.max_steps:
        step = state.step
        lr = lr_at(step, cfg.optim, t.max_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(t.grad_accum):
            batch = {k: v.to(accelerator.device) for k, v in sampler.batch(step, micro).items()}
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = model(batch["input"], batch.get("reset"))
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["target"].reshape(-1))
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / t.grad_accum
        step_loss = float(accelerator.reduce(step_loss, reduction="mean"))
        state.step += 1
        state.symbols_seen += symbols_per_step
        window_loss += step_loss
        window_steps += 1
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": state.step, "loss": step_loss, "lr": lr}) + "\n")

        if state.step % t.log_every == 0 or state.step == t.max_steps:
            elapsed = time.perf_counter() - t0
            rate = window_steps * symbols_per_step / max(elapsed, 1e-9)
            last = {"train/loss": window_loss / window_steps,
                    "train/bits_per_symbol": window_loss / window_steps / LN2,
                    "train/symbols_per_second": rate, "train/lr": lr}
            accelerator.log(last, step=state.step)
            bar.set_postfix(loss=f"{last['train/loss']:.3f}", bps=f"{last['train/bits_per_symbol']:.3f}",
                            sym_s=f"{rate:,.0f}")
            t0, window_loss, window_steps = time.perf_counter(), 0.0, 0
        bar.update(1)

        done = state.step == t.max_steps
        halt = t.halt_at > 0 and state.step == t.halt_at and not done
        if val_sampler is not None and (state.step % t.eval_every == 0 or done):
            state.last_val_bpb = validate(model, val_sampler, accelerator, t.eval_batches)
            accelerator.log({"val/bits_per_symbol": state.last_val_bpb}, step=state.step)
            if main:
                bar.write(f"step {state.step}: validation {state.last_val_bpb:.4f} bits per {unit}")
        if state.step % t.save_every == 0 or done or halt:
            state.saves = accelerator.project_configuration.iteration + 1
            accelerator.save_state()
        if halt:
            if main:
                bar.write(f"halted at step {state.step} (train.halt_at); continue with --resume")
            bar.close()
            accelerator.end_training()
            return {"step": state.step, "halted": True, "val_bits_per_symbol": state.last_val_bpb, **last}
    bar.close()

    result = {"step": state.step, "val_bits_per_symbol": state.last_val_bpb, **last}
    accelerator.wait_for_everyone()
    if main:
        export(accelerator.unwrap_model(model), cfg, state, out_dir / "model")
        (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        report(accelerator.unwrap_model(model), cfg, result, out_dir)
    accelerator.end_training()
    return result


def report(model, cfg: Config, result: dict, out_dir: Path) -> None:
    """The end of a run: where things are, the validation figure, and a sample (text models)."""
    import sys

    unit = "byte" if cfg.data.kind == "text" else "symbol"
    print(f"\nexported model: {out_dir / 'model'}")
    if not math.isnan(result["val_bits_per_symbol"]):
        print(f"validation: {result['val_bits_per_symbol']:.4f} bits per {unit}")
    if cfg.data.kind == "text" and cfg.train.sample_bytes > 0:
        from bytemamba.generate import Sampling, generate_text

        g = cfg.generate
        print(f"sample (temperature {g.temperature}):\n{g.prompt}", end="")
        model.eval()
        generate_text(model, g.prompt, cfg.train.sample_bytes, Sampling(g.temperature, g.top_k, g.top_p, g.min_p),
                      seed=g.seed, stream=sys.stdout)


def export(model, cfg: Config, state: TrainState, path: Path) -> None:
    """The exported model directory: weights, model config, and what generate/eval need to know."""
    extra = {"data": asdict(cfg.data), "audio": asdict(cfg.audio),
             "training": {"step": state.step, "symbols_seen": state.symbols_seen,
                          "val_bits_per_symbol": state.last_val_bpb}}
    model.save_pretrained(path, extra=extra)
