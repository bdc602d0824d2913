"""The training loop, on HuggingFace Accelerate: one CPU, one GPU or many (`accelerate launch`).

    cfg -> streams (data) -> ByteMambaLM (model) -> AdamW + warmup/cosine -> Accelerate loop
        -> metrics.jsonl, trackers, checkpoints/ (Accelerate state), model/ (exported safetensors)

Everything a resumed run needs is in Accelerate's state (model, optimizer, RNG) plus `TrainState`
(step, checkpoints written, data seen), registered for checkpointing. Batches are a pure function of
(seed, step, micro-step, rank), so a resumed run sees the batches an uninterrupted one would have seen.

Data parallel: every rank takes its slice of the global batch; DDP averages gradients; metrics, validation
printing, checkpoint manifests and the export happen on the main process; validation sums are reduced over
ranks. Faults (see checkpoint.py for the on-disk side):
- SIGTERM / SIGINT: the current step finishes, a checkpoint is saved, the run exits 0 with a message
  (a second signal interrupts at once). Ranks agree on stopping through the per-step all-reduce.
- A non-finite loss on any rank skips the optimizer step on every rank (same all-reduce) and is counted;
  `train.max_bad_steps` in a row abort with the step and the data offsets of the offending windows.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from bytemamba.checkpoint import Checkpoints
from bytemamba.config import Config, OptimConfig, to_toml
from bytemamba.data.quantize import describe_bits
from bytemamba.errors import UserError


class TrainingAborted(UserError, RuntimeError):
    """The run cannot go on (too many non-finite losses in a row); the message says where and on what data."""

LN2 = math.log(2.0)


class TrainState:
    """The training counters; a checkpoint's manifest keeps them (bytemamba.checkpoint: written by
    Checkpoints.save, read back by restore_counters)."""

    def __init__(self):
        self.step = 0            # optimizer steps completed
        self.saves = 0           # checkpoints written (Accelerate's save iteration)
        self.symbols_seen = 0    # training symbols consumed, all ranks
        self.bad_steps = 0       # non-finite losses skipped, in total
        self.last_val_bpb = float("nan")


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
    # checkpoint folders get Accelerate's automatic names (checkpoint_<iteration>), but bytemamba.checkpoint
    # writes them under a temporary name, renames them whole and keeps the last train.keep_checkpoints
    project = ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs"),
                                   automatic_checkpoint_naming=False)
    logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNotice())
    return Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=t.grad_accum,
                       log_with=trackers, project_config=project)


class _TiedWeightsNotice(logging.Filter):
    """Accelerate warns on every save that the tied lm_head was "removed"; that is the intended
    de-duplication (the head is re-tied on load), so the line is noise in every run's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def _flat(cfg: Config) -> dict:
    return {f"{s}.{k}": v for s, sec in asdict(cfg).items() for k, v in sec.items()}


# ---- losses and signals ---------------------------------------------------------------------------

def window_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of each window: (b, l, v), (b, l) -> (b,). Their mean is the batch loss."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="none")
    return nll.view(target.shape).mean(dim=1)


class GracefulStop:
    """SIGTERM / SIGINT set a flag that the loop checks after each step; a second signal stops at once.

    Signals within `grace` seconds of the first count as one: Ctrl-C under `accelerate launch` reaches a
    worker twice (from the terminal, then forwarded by the launcher).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace: float = 2.0, verbose: bool = True):
        self.received = None
        self.verbose = verbose
        self.grace = grace
        self._first = 0.0
        self._old = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            if time.monotonic() - self._first < self.grace:
                return
            self.uninstall()                                # a real second signal: do not wait for the step
            raise KeyboardInterrupt
        self._first = time.monotonic()
        self.received = signal.Signals(signum).name
        if self.verbose:
            print(f"\nreceived {self.received}: finishing this step, then saving a checkpoint "
                  f"(send it again to stop at once)", flush=True)

    def install(self):
        try:
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:                                  # not the main thread: leave signals alone
            self._old = {}
        return self

    def uninstall(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume from `step`, drop metric lines of steps the crashed run did past its checkpoint."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:                        # a line cut short by the crash
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    tmp.replace(path)


def _global_offsets(sampler, step: int, micros: int) -> list[list[int]]:
    """Window starts of the whole global batch of `step`: [micro][rank * batch + row]."""
    import copy

    g = copy.copy(sampler)
    g.batch_size, g.rank, g.world_size = sampler.batch_size * sampler.world_size, 0, 1
    return [[int(x) for x in g.starts(step, m)] for m in range(micros)]


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

def _streams_main_first(accelerator, cfg: Config):
    """The (train, val) streams; the main process prepares them first (an audio recipe decodes and caches its
    clips once, not once per rank), then the other ranks open its cache. A failure on the main process still
    reaches the barrier, so the other ranks do not wait for it forever: they try the same preparation and
    fail with the same message."""
    from bytemamba.data import build_streams
    if accelerator.num_processes == 1:
        return build_streams(cfg.data, cfg.audio)
    streams = error = None
    if accelerator.is_main_process:
        try:
            streams = build_streams(cfg.data, cfg.audio)
        except Exception as e:                  # re-raised after the barrier
            error = e
    accelerator.wait_for_everyone()
    if error is not None:
        raise error
    return streams if streams is not None else build_streams(cfg.data, cfg.audio)


def train(cfg: Config, resume: bool = False) -> dict:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from bytemamba.data import make_sampler
    from bytemamba.models.lm import ByteMambaLM

    t = cfg.train
    out_dir = Path(t.out_dir)
    accelerator = make_accelerator(cfg, out_dir)
    main = accelerator.is_main_process
    set_seed(t.seed)                                          # same initial weights on every rank

    train_stream, val_stream = _streams_main_first(accelerator, cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    sampler = make_sampler(train_stream, cfg, "train", rank, world)
    val_sampler = make_sampler(val_stream, cfg, "val", rank, world) if len(val_stream) > t.seq_len + 1 else None

    model = ByteMambaLM(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()         # saved in each checkpoint's manifest, not by Accelerate (no pickle to load)

    previous = out_dir / "checkpoints"
    if not resume and previous.is_dir() and any(previous.iterdir()):   # every rank sees the same files
        raise UserError(f"{out_dir} holds checkpoints of a previous run: continue it with --resume, or "
                        f"choose another train.out_dir (or delete {previous})")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(to_toml(cfg))
    metrics_path = out_dir / "metrics.jsonl"
    checkpoints = Checkpoints(accelerator, out_dir, t.keep_checkpoints, cfg.model)
    if resume:
        found = checkpoints.resume(state)                      # newest checkpoint that verifies
        state.saves = accelerator.save_iteration
        if main:
            _truncate_metrics(metrics_path, state.step)
            print(f"resumed from step {state.step} ({found['path']})", flush=True)
            if found.get("world_size", world) != world:
                print(f"note: the checkpoint was written by {found['world_size']} process(es), this run has "
                      f"{world}: the global batch is now {world} x {t.batch_size} windows per micro-step "
                      f"(was {found['world_size']} x {t.batch_size}); batches differ from the original run's",
                      flush=True)
    elif main:
        checkpoints.start_fresh(metrics_path)                  # no old checkpoints: clear stale metrics
    if accelerator.log_with:
        accelerator.init_trackers("bytemamba", config=_flat(cfg))

    n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    if main:
        print(f"model: {n_params / 1e6:.2f}M parameters, {cfg.model.n_layer} layers x d_model "
              f"{cfg.model.d_model}; data: {len(train_stream):,} train / {len(val_stream):,} val symbols; "
              f"device {accelerator.device} x{world}, precision {accelerator.mixed_precision}", flush=True)

    symbols_per_step = t.batch_size * t.seq_len * t.grad_accum * world
    bar = tqdm(total=t.max_steps, initial=state.step, disable=not main, dynamic_ncols=True, unit="step")
    model.train()
    t0, window_loss, window_steps = time.perf_counter(), 0.0, 0
    last = {}
    bad_in_a_row = 0
    stop = GracefulStop(verbose=main).install()

    def save():
        state.saves = accelerator.save_iteration + 1
        return checkpoints.save(state, model)

    try:
        while state.step < t.max_steps:
            step = state.step
            lr = lr_at(step, cfg.optim, t.max_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            step_loss = torch.zeros((), device=accelerator.device)
            bad_rows = torch.zeros(t.grad_accum, t.batch_size, device=accelerator.device)
            for micro in range(t.grad_accum):
                batch = {k: v.to(accelerator.device) for k, v in sampler.batch(step, micro).items()}
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        logits = model(batch["input"], batch.get("reset"))
                    per_window = window_losses(logits, batch["target"])
                    loss = per_window.mean()
                    accelerator.backward(loss)
                bad_rows[micro] = (~torch.isfinite(per_window.detach())).float()
                step_loss += loss.detach() / t.grad_accum
            # one all-reduce per step: the loss, whether any rank saw a non-finite loss, whether any rank
            # was asked to stop. Every rank takes the same decision, so DDP never waits on a missing rank.
            flags = torch.stack([torch.nan_to_num(step_loss.float(), nan=0.0, posinf=0.0, neginf=0.0),
                                 bad_rows.sum().float(),
                                 torch.tensor(float(stop.received is not None), device=accelerator.device)])
            flags = accelerator.reduce(flags, reduction="sum")
            nonfinite, stopping = flags[1].item() > 0, flags[2].item() > 0
            if nonfinite:
                optimizer.zero_grad(set_to_none=True)          # skip the update on every rank
                state.bad_steps += 1
                bad_in_a_row += 1
                where = accelerator.gather(bad_rows[None]).cpu()    # (world, micro, row)
                offsets = _global_offsets(sampler, step, t.grad_accum)
                bad_offsets = [offsets[m][r * t.batch_size + i] for r, m, i in where.nonzero().tolist()]
                if main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": step + 1, "skipped": "non-finite loss", "lr": lr,
                                            "bad_offsets": bad_offsets}) + "\n")
                    bar.write(f"step {step + 1}: non-finite loss, update skipped ({bad_in_a_row} in a row, "
                              f"{state.bad_steps} in total); window offsets {bad_offsets}")
                if bad_in_a_row >= t.max_bad_steps:
                    raise TrainingAborted(
                        f"aborting at step {step + 1}: {bad_in_a_row} non-finite losses in a row "
                        f"(train.max_bad_steps={t.max_bad_steps}); the last batch's offending windows start at "
                        f"offsets {bad_offsets} of the training stream (length {t.seq_len + 1} each)")
            else:
                bad_in_a_row = 0
                if cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss = float(flags[0]) / world
            state.step += 1
            state.symbols_seen += symbols_per_step
            if not nonfinite:
                window_loss += step_loss
                window_steps += 1
                if main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": state.step, "loss": step_loss, "lr": lr}) + "\n")

            if (state.step % t.log_every == 0 or state.step == t.max_steps) and window_steps:
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
                    bar.write(f"step {state.step}: validation "
                              f"{describe_bits(state.last_val_bpb, cfg.data.kind, cfg.audio.quantizer)}")
            if state.step % t.save_every == 0 or done or halt or stopping:
                saved = save()
            if halt or (stopping and not done):
                why = "train.halt_at" if halt else stop.received or "a signal on another rank"
                if main:
                    bar.write(f"stopped at step {state.step} ({why}); checkpoint {saved}; "
                              f"continue with --resume")
                bar.close()
                accelerator.end_training()
                return {"step": state.step, "halted": True, "stopped_by": why, "checkpoint": str(saved),
                        "bad_steps": state.bad_steps, "val_bits_per_symbol": state.last_val_bpb, **last}
    finally:
        stop.uninstall()
        bar.close()

    result = {"step": state.step, "val_bits_per_symbol": state.last_val_bpb, "bad_steps": state.bad_steps,
              **last}
    accelerator.wait_for_everyone()
    if accelerator.is_fsdp2 or "FSDP" in str(accelerator.distributed_type):
        full = accelerator.get_state_dict(model)               # gathered from the shards on every rank
        final = None
        if main:
            final = ByteMambaLM(cfg.model)
            final.load_state_dict(full)
            final.to(accelerator.device)
    else:
        final = accelerator.unwrap_model(model)
    if main:
        export(final, cfg, state, out_dir / "model", train_symbols=len(train_stream))
        (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        report(final, cfg, result, out_dir)
    accelerator.end_training()
    return result


def report(model, cfg: Config, result: dict, out_dir: Path) -> None:
    """The end of a run: where things are, the validation figure, and a sample (text models)."""
    import sys

    print(f"\nexported model: {out_dir / 'model'}")
    if not math.isnan(result["val_bits_per_symbol"]):
        print(f"validation: {describe_bits(result['val_bits_per_symbol'], cfg.data.kind, cfg.audio.quantizer)}")
    if cfg.data.kind == "text" and cfg.train.sample_bytes > 0:
        from bytemamba.generate import Sampling, generate_text

        g = cfg.generate
        print(f"sample (temperature {g.temperature}):\n{g.prompt}", end="")
        model.eval()
        generate_text(model, g.prompt, cfg.train.sample_bytes, Sampling.from_config(g),
                      seed=g.seed, stream=sys.stdout)


def export(model, cfg: Config, state: TrainState, path: Path, train_symbols: int | None = None) -> None:
    """The exported model directory: weights, model config, and what generate/eval need to know."""
    extra = {"data": asdict(cfg.data), "audio": asdict(cfg.audio), "generate": asdict(cfg.generate),
             "training": {"step": state.step, "symbols_seen": state.symbols_seen,
                          "val_bits_per_symbol": state.last_val_bpb, "bad_steps": state.bad_steps,
                          "train_symbols": train_symbols}}
    model.save_pretrained(path, extra=extra)
