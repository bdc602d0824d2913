"""`bytemamba train|generate|eval|bench|convert|info`: parses arguments and dispatches, nothing more.

Bad input (bytemamba.errors.UserError) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from bytemamba.errors import UserError


def _train(args) -> int:
    from bytemamba.config import load_config
    from bytemamba.train import train

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:         # `bytemamba train key=value ...` with no recipe
        overrides.insert(0, recipe)
        recipe = None
    cfg = load_config(recipe, overrides)
    result = train(cfg, resume=args.resume)
    return 0 if result is not None else 1


def _load(path, device: str):
    import torch

    from bytemamba.models.io import load_model
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but PyTorch sees no CUDA GPU")
    return load_model(path, device=device)


def _sampling(args, meta: dict, audio: bool):
    """--temperature/--top-k/--top-p/--min-p; a flag not given comes, for an audio model, from the [generate]
    section of the recipe it was trained with (kept in config.json), else 1.0/0/1.0/0 (the model's own
    distribution); for text 0.8/0/1.0/0."""
    from bytemamba.generate import Sampling

    base = vars(Sampling.from_config({"temperature": 1.0, **meta.get("generate", {})}) if audio else Sampling())
    return Sampling(**{k: base[k] if getattr(args, k) is None else getattr(args, k) for k in base})


def _generate(args) -> int:
    from bytemamba.generate import generate_text, print_samples

    model, meta = _load(args.checkpoint, args.device)
    kind = meta.get("data", {}).get("kind", "text")
    sampling = _sampling(args, meta, args.audio or kind == "audio")
    if args.audio or kind == "audio":
        return _generate_audio(args, model, meta, sampling)
    if kind != "text":
        raise UserError(f"{args.checkpoint} is a model of {kind} symbols; a text --prompt does not fit it")
    if args.max_bytes < 1:
        raise UserError(f"--max-bytes must be at least 1, got {args.max_bytes}")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.num_samples == 1:
        sys.stdout.write(args.prompt)
        generate_text(model, args.prompt, args.max_bytes, sampling, args.seed, 1, stream=sys.stdout,
                      graphs=not args.no_graphs)
    else:
        texts = generate_text(model, args.prompt, args.max_bytes, sampling, args.seed, args.num_samples,
                              graphs=not args.no_graphs)
        print_samples(args.prompt, texts)
    return 0


def _generate_audio(args, model, meta, sampling) -> int:
    from bytemamba.generate_audio import generate_audio

    if meta.get("data", {}).get("kind", "text") != "audio":
        raise UserError(f"{args.checkpoint} is a text model; --audio needs a model trained on audio")
    if args.out is None:
        raise UserError("--audio needs --out DIR (where the WAVs, PNGs and samples.json go)")
    records = generate_audio(model, meta, args.seconds, args.num_samples, args.out, args.prompt_wav,
                             sampling, args.seed, graphs=not args.no_graphs)
    for r in records:
        print(f"{r['rank']:>3}. {args.out}/{r['wav']}  {r['bits_per_sample']:.3f} bits per sample")
    print(f"wrote {len(records)} clip(s), PNGs and samples.json (ranked by log-likelihood) to {args.out}")
    return 0


def _eval(args) -> int:
    from bytemamba.evaluate import eval_files, list_files

    if args.window < 1:
        raise UserError(f"--window must be at least 1, got {args.window}")
    model, meta = _load(args.checkpoint, args.device)
    if meta.get("data", {}).get("kind", "text") == "audio":
        from bytemamba.data.audio import describe_eval, eval_audio
        from bytemamba.generate_audio import audio_config_of

        res = eval_audio(model, audio_config_of(meta, args.checkpoint), args.data, window=args.window,
                         pattern=args.pattern)
        print(describe_eval(res))
        return 0
    files = list_files(args.data, args.pattern)
    res = eval_files(model, files, window=args.window)
    print(f"{res['bits_per_symbol']:.4f} bits per byte over {res['symbols']:,} bytes in {len(files)} file(s)")
    return 0


def _bench(args) -> int:
    from bytemamba import bench
    return bench.main(args.rest)


def _convert(args) -> int:
    from bytemamba.convert import convert, describe
    print(describe(convert(args.src, args.dst)))
    return 0


def _info(args) -> int:
    from bytemamba.info import format_info, info, to_json
    r = info(args.path)
    print(to_json(r) if args.json else format_info(r))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bytemamba", description="Tokenizer-free Mamba over raw byte streams.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a TOML recipe (default: the embedded text recipe)")
    t.add_argument("recipe", nargs="?", help="recipe TOML (recipes/*.toml); omit for the default")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    t.set_defaults(fn=_train)

    g = sub.add_parser("generate", help="sample from an exported model directory")
    g.add_argument("checkpoint", help="exported model directory (OUT/model)")
    g.add_argument("--prompt", default="", help="text to continue (UTF-8); empty starts from a newline")
    g.add_argument("--max-bytes", type=int, default=256)
    g.add_argument("--temperature", type=float, default=None,
                   help="default 0.8 for text; for audio the recipe's [generate] value, else 1.0")
    g.add_argument("--top-k", type=int, default=None, help="default 0 (off); audio: the recipe's [generate]")
    g.add_argument("--top-p", type=float, default=None, help="default 1.0 (off); audio: the recipe's [generate]")
    g.add_argument("--min-p", type=float, default=None, help="default 0.0 (off); audio: the recipe's [generate]")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--no-graphs", action="store_true",
                   help="decode without CUDA graphs (same symbols, slower; graphs are always off on CPU)")
    g.add_argument("--audio", action="store_true",
                   help="audio model: write --num-samples clips (WAV + PNG + samples.json) to --out")
    g.add_argument("--seconds", type=float, default=1.0, help="audio: length of each generated clip")
    g.add_argument("--out", default=None, help="audio: output folder")
    g.add_argument("--prompt-wav", default=None, help="audio: continue this audio file (any readable format)")
    g.set_defaults(fn=_generate)

    e = sub.add_parser("eval", help="streaming bits per byte of a model over a file or folder")
    e.add_argument("checkpoint", help="exported model directory (OUT/model)")
    e.add_argument("--data", required=True, help="file or folder to evaluate (audio models: a folder, list "
                   "file or audio file, decoded with the model's rate and quantizer)")
    e.add_argument("--pattern", default="*", help="glob for files inside a folder")
    e.add_argument("--window", type=int, default=2048, help="symbols per forward; state carries across")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.set_defaults(fn=_eval)

    b = sub.add_parser("bench", help="benchmarks (scan, generate); see `bytemamba bench --help`",
                       add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=_bench)

    c = sub.add_parser("convert", help="import a public Mamba / MambaByte checkpoint (config.json + "
                                       "pytorch_model.bin) as model.safetensors + config.json")
    c.add_argument("src", help="directory with config.json and pytorch_model.bin (read with weights_only=True)")
    c.add_argument("dst", help="new bytemamba model directory")
    c.set_defaults(fn=_convert)

    i = sub.add_parser("info", help="parameters, config, step, data seen and last validation of a checkpoint")
    i.add_argument("path", help="exported model directory, OUT/checkpoints/checkpoint_K, or a run directory OUT")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(fn=_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"bytemamba: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bytemamba: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
