"""Command-line options shared by ``pipesim run`` and ``python -m pipesim.executor`` (no MPI, no torch)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..cli_args import check_output_file, positive_float
from ..scenario import STRATEGY_NAMES, Scenario, ScenarioError, load_scenario

SET_HELP = ("override a scenario field, e.g. acceptance.alpha=0.5, executor.link_emulation=true, "
            "network.bandwidth=100Mbit/s (repeatable)")
VARIANT_HELP = ("run one more generation in the same job with these extra overrides, ';'-separated, e.g. "
                "'strategy.name=pipeinfer;acceptance.alpha=0.3' (repeatable; models are loaded once)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a measured run (the scenario and what to write)."""
    parser.add_argument("scenario", metavar="SCENARIO", help="scenario YAML file")
    parser.add_argument("--strategy", choices=STRATEGY_NAMES, help="override strategy.name")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    parser.add_argument("--variant", action="append", default=[], metavar="K=V;K=V", help=VARIANT_HELP)
    parser.add_argument("--trace", metavar="FILE", type=check_output_file,
                        help="for viewing: a Chrome/Perfetto trace JSON of the run (open in ui.perfetto.dev)")
    parser.add_argument("--records", metavar="FILE", type=check_output_file,
                        help="for analysis: the raw trace records as a table (.csv or .parquet)")
    parser.add_argument("--save-trace", metavar="FILE", type=check_output_file,
                        help="for re-loading: the pipesim trace(s) with metrics and metadata as JSON (a list, one per run; "
                             "what `pipesim validate` reads)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per run: the metrics of `pipesim simulate --json` plus "
                             "output_tokens and output_text")
    parser.add_argument("--timeout", type=positive_float, metavar="SECONDS",
                        help="override executor.timeout_s (default: the scenario's, 300 unless set)")


def variant_overrides(variant: str) -> list[str]:
    """The ``key=value`` assignments of one ``--variant`` string."""
    return [part.strip() for part in variant.split(";") if part.strip()]


def load_variants(path: str | Path, sets: Sequence[str], strategy: str | None, variants: Sequence[str],
                  timeout: float | None = None) -> list[tuple[str, Scenario]]:
    """The scenario of each generation: ``--set`` (and ``--strategy``) for all, then each ``--variant``."""
    base = list(sets)
    if strategy:
        base.append(f"strategy.name={strategy}")
    if timeout is not None:
        if timeout <= 0:
            raise ScenarioError(f"--timeout {timeout}: must be > 0 seconds")
        base.append(f"executor.timeout_s={timeout}")
    if not variants:
        return [("", load_scenario(path, base))]
    return [(variant, load_scenario(path, base + variant_overrides(variant))) for variant in variants]


def indexed_path(path: str | Path, index: int, total: int) -> Path:
    """``path`` itself for a single run, else ``name-<index>.suffix``."""
    path = Path(path)
    return path if total == 1 else path.with_name(f"{path.stem}-{index}{path.suffix}")
