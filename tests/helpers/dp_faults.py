"""Run under `accelerate launch --multi_gpu --num_processes 2` by tests/test_distributed.py.

Rank 1 alone sees a non-finite loss (window 0 of step 3) and, later, alone receives SIGTERM (during step 5).
Both ranks must skip step 3's update together and stop together after step 5, with a checkpoint; a rank
that decided differently would leave the other waiting in an all-reduce forever.
"""

import os
import signal
import sys

import bytemamba.train as tr
from bytemamba.config import load_config

rank = int(os.environ.get("RANK", "0"))
real, calls = tr.window_losses, {"n": 0}


def poisoned(logits, target):
    out = real(logits, target)
    step = calls["n"]                       # grad_accum = 1: one call per step
    calls["n"] += 1
    if rank == 1 and step == 2:
        out = out.clone()
        out[0] = float("nan")
    if rank == 1 and step == 4:
        os.kill(os.getpid(), signal.SIGTERM)
    return out


tr.window_losses = poisoned
result = tr.train(load_config(None, sys.argv[1:]))
print(f"rank {rank} result {result}", flush=True)
