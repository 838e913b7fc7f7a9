"""The ``pipesim sweep`` and ``pipesim report`` commands (``register(subparsers)`` adds them to the CLI)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from ..cli_args import OneLineParser, check_output_dir
from ..scenario import ScenarioError

SWEEP_DESCRIPTION = """\
Run every point of a study (a base scenario plus axes of values, cartesian product) through the simulator,
in parallel over local cores, or over MPI ranks when launched under mpiexec (mpiexec -n 8 pipesim sweep ...).
Writes results.parquet and results.csv (one row per point), sweep.json, and the traces of one representative
point per strategy into --out. Points already in --out (same configuration hash) are not simulated again, so
an interrupted sweep resumes where it stopped. One sweep writes a folder at a time; a folder that holds another
study is refused (use another --out, or --force to replace it)."""

REPORT_DESCRIPTION = """\
Turn a sweep folder into report.html (self-contained, figures embedded) and report.md (figures beside it).
Measured or calibration results found in the folder (measured*.csv, validation.csv) add a
predicted-vs-measured figure."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cmd_sweep(args: argparse.Namespace) -> int:
    from concurrent.futures import BrokenExecutor

    from .study import load_study, parse_set_options
    from .sweep import run_sweep

    study = load_study(args.study, parse_set_options(args.set))
    try:
        result = run_sweep(study, args.out, jobs=args.jobs, force=args.force, progress=not args.quiet,
                           traces=not args.no_traces)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, SIGTERM, SIGHUP: workers are ended, finished points kept
        signum = getattr(interrupt, "signum", signal.SIGINT)
        print(f"pipesim: interrupted ({signal.Signals(signum).name}); the finished points are kept in {args.out}: "
              "run the same command again to resume", file=sys.stderr)
        return 128 + signum
    except BrokenExecutor as error:
        print(f"pipesim: error: a sweep worker process died ({error}); the finished points are kept in "
              f"{args.out}: run the same command again to resume", file=sys.stderr)
        return 1
    if result is None:  # an MPI worker rank: it served tasks, the root reports
        return 0
    unique = result.simulated + result.reused
    print(f"{study.name}: {result.points} points ({unique} distinct configurations: {result.simulated} "
          f"simulated, {result.reused} reused), {result.failed} failed, {result.wall_s:.1f} s "
          f"({result.backend} x{result.workers}) -> {result.out}/results.parquet")
    if result.failed:
        for message in sorted(result.errors):
            print(f"  failed: {message}", file=sys.stderr)
        return 1
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    written = build_report(args.folder, args.out, title=args.title)
    print(f"report written: {written.html} and {written.markdown} ({len(written.figures)} figures)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sweep`` and ``report`` to the ``pipesim`` command."""
    sweep = subparsers.add_parser("sweep", help="run a what-if study (many scenarios) in parallel",
                                  description=SWEEP_DESCRIPTION)
    sweep.add_argument("study", metavar="STUDY", help="study YAML file (see scenarios/studies/)")
    sweep.add_argument("--out", required=True, metavar="DIR", type=check_output_dir,
                       help="folder for the results (created if needed)")
    sweep.add_argument("--jobs", "-j", type=_positive_int, default=None, metavar="N",
                       help="local worker processes (default: the cores available; 1 runs in this process)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field of the study's base scenario, e.g. workload.generate_tokens=32")
    sweep.add_argument("--force", action="store_true", help="simulate every point even if already in --out, and replace another study's results there")
    sweep.add_argument("--no-traces", action="store_true", help="do not keep representative traces")
    sweep.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    sweep.set_defaults(func=_cmd_sweep)

    report = subparsers.add_parser("report", help="HTML and Markdown report of a sweep folder",
                                   description=REPORT_DESCRIPTION)
    report.add_argument("folder", metavar="SWEEP_DIR", help="a folder written by `pipesim sweep`")
    report.add_argument("--out", metavar="DIR", default=None, type=check_output_dir,
                        help="write the report here (default: the sweep folder); results.csv is copied along")
    report.add_argument("--title", default=None, metavar="TEXT", help="report title (default: from the study)")
    report.set_defaults(func=_cmd_report)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipesim.reports sweep|report ...`` (the same commands outside the ``pipesim`` CLI)."""
    parser = OneLineParser(prog="python -m pipesim.reports")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ScenarioError, ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"pipesim: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pipesim: interrupted", file=sys.stderr)
        return 130
