"""Decode-step variants side by side (issue 7 tuning, device runs): for each variant (environment settings of
bytemamba/ops/step.py: BYTEMAMBA_STEP_TUNE, BYTEMAMBA_STEP_PDL, BYTEMAMBA_STEP_V2, and the GEMV path's batch
limit) the graph-replayed Mamba step time of each MODEL:BATCH, in one process (models built once).
Same timing as `bytemamba bench generate` (CUDA events around chunks of replays, the median chunk), a shorter
prompt (the step time does not depend on it). Prints one line per measurement, then a table.

    python3 scripts/step_variants.py --configs byte353m:1 byte353m:64 --variants "base:" "pdl:BYTEMAMBA_STEP_PDL=1" \
        "gemv64:gemv=64" "rows4:BYTEMAMBA_STEP_TUNE=ssm_rows=4"
A variant is NAME:SETTING[;SETTING...][@MODEL:BATCH,...]; a SETTING is ENV=VALUE or gemv=N
(ByteMambaLM.gemv_max_batch); the @ list limits it to those configurations (default: all of --configs).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    import torch

    from bytemamba import bench_generate as bg
    from bytemamba.models.lm import ByteMambaLM

    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", required=True, metavar="MODEL:BATCH")
    p.add_argument("--variants", nargs="+", required=True, metavar="NAME:SETTINGS")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=257)
    p.add_argument("--breakdown", nargs="*", default=[], metavar="VARIANT/MODEL:BATCH")
    a = p.parse_args()
    results = {}
    names, plan = [], []
    for v in a.variants:
        v, _, only = v.partition("@")
        name, _, settings = v.partition(":")
        names.append(name)
        env, gemv = {}, ByteMambaLM.gemv_max_batch
        for item in filter(None, settings.split(";")):
            k, _, val = item.partition("=")
            if k == "gemv":
                gemv = int(val)
            else:
                env[k] = val
        plan.append((name, env, gemv, only.split(",") if only else a.configs))
    for cfg in a.configs:                       # configurations outside, so each model is built once
        model, _, b = cfg.partition(":")
        for name, env, gemv, configs in plan:
            if cfg not in configs:
                continue
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            args = argparse.Namespace(prompt=a.prompt, new=a.new, chunk=32, no_profile=True, gemv_max_batch=gemv,
                                      breakdown=[cfg] if f"{name}/{cfg}" in a.breakdown else [], _model_name=model)
            try:
                r = bg._bench_mamba(bg.MODELS[model][0], int(b), args, "cuda")
                results[(name, cfg)] = r["ms"]
                print(f"{name:>12} {cfg:>12}: {r['ms']:.4f} ms/step  ({int(b) / r['ms'] * 1e3:,.0f} sym/s)", flush=True)
            except Exception:
                print(f"{name} {cfg} failed:\n{traceback.format_exc(limit=3)}", flush=True)
                torch.cuda.empty_cache()
            finally:
                for k, old in saved.items():
                    if old is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = old
    print("\n| variant | " + " | ".join(a.configs) + " |")
    print("|---|" + "---|" * len(a.configs))
    for n in names:
        cells = [f"{results[(n, c)]:.4f}" if (n, c) in results else "-" for c in a.configs]
        print(f"| {n} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
