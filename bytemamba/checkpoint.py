"""Training checkpoints that survive crashes: written under a temporary name, renamed, verified on load.

    OUT/checkpoints/checkpoint_K/     Accelerate state (model.safetensors, optimizer.bin, random_states_R.pkl)
                                      + manifest.json
    OUT/.checkpoints-tmp/             where a checkpoint is written before it is renamed into checkpoints/

`checkpoint_K` is Accelerate's own automatic name (K = `accelerator.save_iteration`), so the folder also
works with `accelerator.load_state()`. A checkpoint exists only once its manifest is in place: the manifest
(sizes and sha256 of every file, the training counters, the model config, a parameter fingerprint per rank)
is written last, inside the temporary folder, which is then renamed in one step. A `kill -9` at any point
leaves either the whole checkpoint or nothing under checkpoints/.

On load the manifest is checked file by file; a damaged checkpoint is refused with a message that names
the file, and resume falls back to the previous good one. Checkpoints are ordered by the iteration in their
manifests (not by parsing folder names). Nothing is loaded before its checksum has been verified, and
nothing is unpickled with arbitrary code: Accelerate reads optimizer.bin and random_states_R.pkl with
`torch.load(weights_only=True)`, and the training counters (step, symbols seen, skipped steps, the last
validation figure) come back from the manifest's JSON. Format version 1 also kept those counters in
Accelerate's `custom_checkpoint_0.pkl`, which Accelerate would load with `weights_only=False`; such a
checkpoint is resumed through a folder of links that leaves that file out (`Checkpoints._load_state`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from bytemamba.models.io import CheckpointError

MANIFEST = "manifest.json"
FORMAT = "bytemamba-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)      # 1: the counters also in custom_checkpoint_0.pkl (never read now)
CKPT_SUBDIR = "checkpoints"
TMP_SUBDIR = ".checkpoints-tmp"


# ---- files ----------------------------------------------------------------------------------------

def _hash_file(path: Path, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_table(root: Path, sync: bool = False) -> dict:
    """{relative path: {"size", "sha256"}} for every file under root (FSDP writes sub-folders)."""
    from concurrent.futures import ThreadPoolExecutor

    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST]
    with ThreadPoolExecutor(max_workers=min(8, len(files) or 1)) as pool:   # hashlib releases the GIL
        digests = list(pool.map(lambda p: _hash_file(p, sync), files))
    return {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": h}
            for p, h in zip(files, digests)}


def write_manifest(folder: Path, info: dict) -> dict:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **info,
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": file_table(folder, sync=True)}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    return manifest


def read_manifest(folder: Path) -> dict:
    """The manifest of a checkpoint folder, or CheckpointError naming what is wrong with it."""
    mfile = folder / MANIFEST
    if not mfile.is_file():
        raise CheckpointError(f"{mfile} is missing (checkpoint incomplete or not written by bytemamba)")
    try:
        m = json.loads(mfile.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mfile} is unreadable: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("files"), dict) \
            or not isinstance(m.get("iteration"), int):
        raise CheckpointError(f"{mfile} is not a bytemamba checkpoint manifest")
    if m.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{mfile} has format_version {m.get('format_version')!r}: written by another "
                              f"bytemamba (this one reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    return m


def verify(folder: Path) -> dict:
    """Check every file against the manifest; return the manifest or raise CheckpointError naming the file."""
    from concurrent.futures import ThreadPoolExecutor

    m = read_manifest(folder)
    for rel, want in m["files"].items():                # cheap checks first: presence and size
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"{p} is missing (listed in {MANIFEST})")
        size = p.stat().st_size
        if size != want.get("size"):
            raise CheckpointError(f"{p} is damaged: {size} bytes, {MANIFEST} says {want.get('size')}")
    rels = sorted(m["files"])
    with ThreadPoolExecutor(max_workers=min(8, len(rels) or 1)) as pool:
        digests = list(pool.map(lambda r: _hash_file(folder / r), rels))
    for rel, h in zip(rels, digests):
        if h != m["files"][rel].get("sha256"):
            raise CheckpointError(f"{folder / rel} is damaged: its sha256 differs from {MANIFEST}")
    return m


def list_checkpoints(ckpt_dir: Path) -> tuple[list[tuple[Path, dict]], list[tuple[Path, str]]]:
    """(readable, unreadable): readable ones as (folder, manifest), newest first by manifest iteration."""
    good, bad = [], []
    if not ckpt_dir.is_dir():
        return good, bad
    for d in ckpt_dir.iterdir():
        if not d.is_dir():
            continue
        try:
            good.append((d, read_manifest(d)))
        except CheckpointError as e:
            bad.append((d, str(e)))
    good.sort(key=lambda x: (x[1]["iteration"], x[1].get("step", 0)), reverse=True)
    return good, bad


def find_resumable(ckpt_dir: Path, say=print) -> tuple[Path, dict]:
    """The newest checkpoint that verifies; every refused one is reported through `say`, naming the file."""
    good, bad = list_checkpoints(ckpt_dir)
    problems = [msg for _, msg in bad]
    for msg in problems:
        say(f"refusing checkpoint: {msg}")
    for i, (d, _) in enumerate(good):
        try:
            m = verify(d)
        except CheckpointError as e:
            problems.append(str(e))
            nxt = f"falling back to {good[i + 1][0].name} (step {good[i + 1][1].get('step')})" \
                if i + 1 < len(good) else "no older checkpoint to fall back to"
            say(f"refusing checkpoint: {e}; {nxt}")
            continue
        return d, m
    if not problems:
        raise CheckpointError(f"--resume: no checkpoint under {ckpt_dir}")
    raise CheckpointError(f"--resume: no usable checkpoint under {ckpt_dir} ({'; '.join(problems)})")


# ---- parameters agree across ranks -----------------------------------------------------------------

@torch.no_grad()
def param_fingerprint(model: torch.nn.Module) -> int:
    """An exact fingerprint of the parameter bits: sum over elements of bits * (odd weight), mod 2**64.

    Integer arithmetic, so it does not depend on reduction order; any single changed bit changes it.
    """
    acc = None
    seen = set()
    for i, p in enumerate(model.parameters()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        flat = p.detach().reshape(-1)
        itype = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[flat.element_size()]
        bits = flat.view(itype).to(torch.int64)
        w = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) * 2 + (2 * i + 1) * 1000003
        w = w * 2654435761 + 1
        w = w | 1
        s = (bits * w).sum()
        acc = s if acc is None else acc + s
    return int(acc.item()) if acc is not None else 0


# ---- the manager the training loop uses -------------------------------------------------------------

class _TiedHeadNote(logging.Filter):
    """Accelerate warns on every save that it stored the tied lm_head once; that is expected here."""

    def filter(self, record):
        return "Removed shared tensor {'lm_head.weight'}" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_TiedHeadNote())


class Checkpoints:
    """Save / resume through Accelerate, atomically, keeping the newest `keep`."""

    def __init__(self, accelerator, out_dir: Path, keep: int, model_config=None):
        self.acc = accelerator
        self.dir = Path(out_dir) / CKPT_SUBDIR
        self.tmp_root = Path(out_dir) / TMP_SUBDIR
        self.keep = keep
        self.model_config = model_config

    def _say(self, msg: str) -> None:
        if self.acc.is_main_process:
            print(msg, flush=True)

    def save(self, state, model) -> Path:
        """All ranks call this together. Returns the final folder."""
        acc = self.acc
        iteration = acc.save_iteration
        name = f"checkpoint_{iteration}"                # Accelerate's automatic name
        tmp, final = self.tmp_root / name, self.dir / name
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            self.dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        sharded = "FSDP" in str(acc.distributed_type)   # each rank holds a different shard: nothing to compare
        fingerprint = 0 if sharded else param_fingerprint(model)
        prints = acc.gather(torch.tensor([fingerprint], dtype=torch.int64, device=acc.device)).tolist()
        if not sharded and len(set(prints)) > 1:        # every rank sees the gathered list: all stop together
            raise CheckpointError(f"ranks disagree on the parameters at step {state.step} "
                                  f"(fingerprints {prints}); gradients are not being synchronised")
        acc.save_state(output_dir=str(tmp))             # every rank writes its part (RNG states per rank)
        acc.wait_for_everyone()
        error = [None]
        if acc.is_main_process:
            try:
                self._finish(tmp, final, iteration, state, prints)
            except Exception as e:                      # tell the other ranks instead of leaving them waiting
                error = [f"writing checkpoint {final} failed: {type(e).__name__}: {e}"]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list
            broadcast_object_list(error, from_process=0)
        if error[0] is not None:
            raise CheckpointError(error[0])
        return final

    def _finish(self, tmp: Path, final: Path, iteration: int, state, prints: list) -> None:
        """Main process: manifest last, then one rename into checkpoints/, then drop the oldest."""
        acc = self.acc
        info = {"iteration": iteration,
                "step": state.step, "symbols_seen": state.symbols_seen, "bad_steps": state.bad_steps,
                "last_val_bits_per_symbol": None if math.isnan(state.last_val_bpb) else state.last_val_bpb,
                "world_size": acc.num_processes, "distributed_type": str(acc.distributed_type),
                "rank_param_fingerprints": [str(p) for p in prints]}
        if self.model_config is not None:
            info["model"] = dataclasses.asdict(self.model_config)
        write_manifest(tmp, info)
        if final.exists():                              # a damaged one we fell back from: replace it
            print(f"replacing {final} (not the checkpoint this run resumed from)", flush=True)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        self._prune()
        try:
            self.tmp_root.rmdir()                       # only when empty
        except OSError:
            pass

    def start_fresh(self, metrics_path: Path) -> None:
        """Main process, new run (no --resume; train() has refused an out_dir with checkpoints): remove the
        metrics and half-written checkpoint of an earlier attempt that never saved a whole checkpoint."""
        if Path(metrics_path).exists():
            Path(metrics_path).unlink()
        if self.tmp_root.exists():                      # a checkpoint cut short by a crash
            shutil.rmtree(self.tmp_root, ignore_errors=True)

    def _prune(self) -> None:
        good, _ = list_checkpoints(self.dir)
        for d, _m in good[self.keep:]:
            trash = self.tmp_root / f"old-{d.name}-{os.getpid()}"
            os.replace(d, trash)                        # out of checkpoints/ in one step, then delete
            shutil.rmtree(trash, ignore_errors=True)

    def resume(self, state) -> dict:
        """Load the newest good checkpoint into the prepared objects; all ranks call this together."""
        from accelerate.utils import broadcast_object_list

        acc = self.acc
        choice = [None, None]
        if acc.is_main_process:
            if self.tmp_root.exists():                  # leftovers of a checkpoint interrupted mid-write
                shutil.rmtree(self.tmp_root, ignore_errors=True)
            try:
                d, m = find_resumable(self.dir, say=self._say)
                choice = [str(d), m]
            except CheckpointError as e:
                choice = [None, str(e)]
        if acc.num_processes > 1:
            broadcast_object_list(choice, from_process=0)
        if choice[0] is None:
            raise CheckpointError(choice[1])
        saved_model = choice[1].get("model")
        if saved_model and self.model_config is not None:
            now = dataclasses.asdict(self.model_config)
            diff = [f"model.{k}={saved_model[k]!r} there, {now.get(k)!r} now" for k in sorted(saved_model)
                    if k != "scan_backend" and now.get(k) != saved_model[k]]
            if diff:
                raise CheckpointError(f"--resume: {choice[0]} was written for another model ({'; '.join(diff)})")
        self._load_state(Path(choice[0]))
        acc.project_configuration.iteration = choice[1]["iteration"] + 1
        restore_counters(state, choice[1])
        return {"path": choice[0], **choice[1]}

    def _load_state(self, folder: Path) -> None:
        """accelerator.load_state(folder), except that a version-1 checkpoint's custom_checkpoint_*.pkl is
        never opened: Accelerate unpickles those with weights_only=False (and refuses a count of them that
        differs from the objects registered for checkpointing, none now). Such a folder is loaded through a
        private folder of links to everything else in it."""
        pickles = sorted(folder.glob("custom_checkpoint_*.pkl"))
        if not pickles:
            self.acc.load_state(str(folder))
            return
        view = self.tmp_root / f"load-{folder.name}-rank{self.acc.process_index}-{os.getpid()}"
        shutil.rmtree(view, ignore_errors=True)
        view.mkdir(parents=True)
        try:
            for entry in folder.iterdir():
                if entry not in pickles:
                    (view / entry.name).symlink_to(entry.resolve())
            self.acc.load_state(str(view))
        finally:
            shutil.rmtree(view, ignore_errors=True)


def restore_counters(state, manifest: dict) -> None:
    """The training counters a checkpoint's manifest holds (written by Checkpoints._finish) back into `state`."""
    state.step = int(manifest["step"])
    state.symbols_seen = int(manifest.get("symbols_seen", 0))
    state.bad_steps = int(manifest.get("bad_steps", 0))
    v = manifest.get("last_val_bits_per_symbol")
    state.last_val_bpb = float("nan") if v is None else float(v)
