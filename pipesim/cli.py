"""The ``pipesim`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import acceptance_fit
from . import plan as plan_commands
from .calibration import calibrate, validate
from .cli_args import OneLineParser, check_output_file
from .describe import describe_scenario, print_metrics
from .executor import commands as executor_commands
from .models import commands as model_commands
from .reports import commands as report_commands
from .scenario import SET_HELP, STRATEGY_NAMES, ScenarioError, load_cli_scenario


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .limits import check_simulation_memory
    from .metrics import clean_for_json, compute_metrics
    from .sim import simulate
    from .trace import write_chrome_trace

    scenario = load_cli_scenario(args.scenario, args.set, args.strategy)
    if args.no_records and (args.trace or args.records):
        raise ValueError(f"--no-records keeps no records to write to {args.trace or args.records}")
    if not args.no_records:
        check_simulation_memory(scenario)
    trace = simulate(scenario, records=not args.no_records)
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
        print(f"simulated: scenario {scenario.name!r}, strategy {scenario.strategy.name} (SimPy model: every "
              f"time below is simulated time, not a measurement)")
        print("\n".join(describe_scenario(scenario)))
        print()
        print_metrics(metrics, simulated=True)
        if args.trace:
            print(f"trace written to {args.trace} (open in ui.perfetto.dev)")
    return 0


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already names its default or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or not action.option_strings or action.default in (None, False, [])
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class CommandParser(OneLineParser):
    """An ``ArgumentParser`` whose help shows defaults and whose errors are one line; sub-commands (and theirs)
    inherit it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def package_version() -> str:
    """The installed distribution's version (the source tree's when run from a checkout that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pipesim")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="pipesim",
        description="Predict (simulate) and measure (execute) pipelined speculative LLM inference.")
    parser.add_argument("--version", action="version", version=f"pipesim {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    sub.required = True

    sim = sub.add_parser("simulate", help="simulate a scenario with the SimPy model",
                         description="Simulate a scenario and print its metrics (simulated time, not measured).")
    sim.add_argument("scenario", nargs="?", default=None, metavar="SCENARIO",
                     help="scenario YAML file (default: the built-in default scenario)")
    sim.add_argument("--strategy", choices=STRATEGY_NAMES, help="override strategy.name")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    sim.add_argument("--trace", metavar="FILE", type=check_output_file,
                     help="for viewing: a Chrome/Perfetto trace JSON of the run (open in ui.perfetto.dev)")
    sim.add_argument("--records", metavar="FILE", type=check_output_file,
                     help="for analysis: the raw trace records as a table (.csv or .parquet)")
    sim.add_argument("--json", action="store_true", help="print one JSON object with the metrics")
    sim.add_argument("--no-records", action="store_true",
                     help="metrics only: keep no trace records (memory does not grow with them; the same metrics)")
    sim.set_defaults(func=_cmd_simulate)

    for module in (model_commands, executor_commands, report_commands, calibrate, validate, plan_commands,
                   acceptance_fit):
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
    except BrokenPipeError:  # the reader of our output went away (`| head`): no traceback, nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
