"""The ``pipesim`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import plan as plan_commands
from .calibration import calibrate, validate
from .executor import commands as executor_commands
from .metrics import print_metrics
from .models import commands as model_commands
from .reports import commands as report_commands
from .scenario import SET_HELP, STRATEGY_NAMES, ScenarioError, load_cli_scenario


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .metrics import clean_for_json, compute_metrics
    from .sim import simulate
    from .trace import write_chrome_trace

    scenario = load_cli_scenario(args.scenario, args.set, args.strategy)
    trace = simulate(scenario)
    for warning in trace.meta.get("warnings", []):
        print(f"pipesim: note: {warning}", file=sys.stderr)
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
    parser = argparse.ArgumentParser(
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
    sim.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace JSON of the run")
    sim.add_argument("--records", metavar="FILE", help="write the raw trace records (.csv or .parquet)")
    sim.add_argument("--json", action="store_true", help="print one JSON object with the metrics")
    sim.set_defaults(func=_cmd_simulate)

    for module in (model_commands, executor_commands, report_commands, calibrate, validate, plan_commands):
        module.register(sub)  # a broken import is an error here, never a silently missing command
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


if __name__ == "__main__":
    sys.exit(main())
