"""The ``pipesim`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .cli_args import OneLineParser, check_output_file
from .scenario import STRATEGY_NAMES, Scenario, ScenarioError, load_scenario

SET_HELP = ("override a scenario field, e.g. acceptance.alpha=0.5, network.bandwidth=100Mbit/s, "
            "network.latency=50us, workload.generate_tokens=256 (repeatable)")


def resolve_scenario_path(name: str | None) -> Path:
    """A scenario file path; ``None`` or ``default`` means the built-in default scenario."""
    if name is None or name == "default":
        return Path(str(resources.files("pipesim") / "data" / "default.yaml"))
    return Path(name)


def load_cli_scenario(name: str | None, sets: Sequence[str], strategy: str | None) -> Scenario:
    overrides = list(sets)
    if strategy:
        overrides.append(f"strategy.name={strategy}")
    return load_scenario(resolve_scenario_path(name), overrides)


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_format_value(v)}" for k, v in value.items())
    return str(value)


def print_metrics(metrics: dict[str, Any], file=sys.stdout) -> None:
    """Metrics as an aligned two-column table."""
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {_format_value(value)}", file=file)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .limits import check_simulation_memory
    from .metrics import clean_for_json, compute_metrics
    from .sim import simulate
    from .trace import write_chrome_trace

    scenario = load_cli_scenario(args.scenario, args.set, args.strategy)
    check_simulation_memory(scenario)
    trace = simulate(scenario)
    metrics = clean_for_json(compute_metrics(trace))
    if args.trace:
        write_chrome_trace(trace, args.trace)
    if args.records:
        frame = trace.to_frame()
        path = Path(args.records)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".parquet":
            frame.to_parquet(path, index=False)
        else:
            frame.to_csv(path, index=False)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"simulated: scenario {scenario.name!r}, strategy {scenario.strategy.name}")
        print_metrics(metrics)
        if args.trace:
            print(f"trace written to {args.trace} (open in ui.perfetto.dev)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="pipesim",
        description="Predict (simulate) and measure (execute) pipelined speculative LLM inference.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sim = sub.add_parser("simulate", help="simulate a scenario with the SimPy model",
                         description="Simulate a scenario and print its metrics (simulated time, not measured).")
    sim.add_argument("scenario", nargs="?", default=None,
                     help="scenario YAML file (default: the built-in default scenario)")
    sim.add_argument("--strategy", choices=STRATEGY_NAMES, help="override strategy.name")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    sim.add_argument("--trace", metavar="FILE", type=check_output_file, help="write a Chrome/Perfetto trace JSON of the run")
    sim.add_argument("--records", metavar="FILE", type=check_output_file, help="write the raw trace records (.csv or .parquet)")
    sim.add_argument("--json", action="store_true", help="print one JSON object with the metrics")
    sim.set_defaults(func=_cmd_simulate)

    for module in ("pipesim.models.commands", "pipesim.executor.commands", "pipesim.reports.commands",
                   "pipesim.calibration.calibrate", "pipesim.calibration.validate"):
        try:
            register = __import__(module, fromlist=["register"]).register
        except ImportError:
            continue
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ScenarioError, ValueError, FileNotFoundError) as error:
        print(f"pipesim: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pipesim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`| head`): no traceback, nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
