"""``pipesim run``: measure a scenario with the MPI executor (imports neither mpi4py nor torch)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from ..cli_args import int_at_least
from ..scenario import ScenarioError
from .launcher import START_MARGIN_S, launch_command, rank_environment, run_job
from .limits import check_memory
from .options import add_run_arguments, load_variants
from .plan import make_plan

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``run`` command to a CLI's subparsers."""
    run = subparsers.add_parser(
        "run", help="measure a scenario with the MPI executor (real or emulated compute)",
        description="Check a scenario, then run it on N local MPI ranks (mpiexec -n N python -m "
                    "pipesim.executor ...) and print its measured metrics. Rank 0 is the head.")
    add_run_arguments(run)
    run.add_argument("--ranks", type=int_at_least(1), metavar="N", help="number of MPI ranks (default: cluster.count)")
    run.add_argument("--netns", action="store_true",
                     help="root only: run each rank in its own network namespace, MPI over TCP on veth links shaped "
                          "by the kernel (tc tbf) to network.bandwidth or --netns-bandwidth; torn down afterwards")
    run.add_argument("--netns-bandwidth", metavar="RATE",
                     help="with --netns: the kernel-shaped bandwidth of every link (e.g. 100Mbit/s), so the "
                          "scenario's network section can stay for latency emulation")
    run.set_defaults(func=_cmd_run)
    return run


def rank_arguments(args: argparse.Namespace) -> list[str]:
    """The arguments every rank gets (the front end's own, passed on)."""
    argv = [args.scenario]
    if args.strategy:
        argv += ["--strategy", args.strategy]
    for assignment in args.set:
        argv += ["--set", assignment]
    for variant in args.variant:
        argv += ["--variant", variant]
    for flag in ("trace", "records", "save_trace", "timeout"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if args.json:
        argv.append("--json")
    return argv


def _cmd_run(args: argparse.Namespace) -> int:
    variants = load_variants(args.scenario, args.set, args.strategy, args.variant, args.timeout)
    n_ranks = args.ranks if args.ranks is not None else variants[0][1].cluster.count
    plans = [make_plan(scenario, n_ranks) for _, scenario in variants]
    warning = check_memory(plans)  # every rank runs on this machine
    if warning is not None:
        print(f"pipesim run: {warning}", file=sys.stderr, flush=True)
    argv = rank_arguments(args) + ["--ranks", str(n_ranks)]
    command = launch_command(n_ranks, argv)
    threads = max(plan.executor.threads_per_rank for plan in plans)
    limit = sum(plan.executor.timeout_s for plan in plans) + START_MARGIN_S
    env = rank_environment(threads)
    if sys.stderr.isatty() and not args.json:  # the ranks' output is piped through: rank 0 shows a tokens bar
        env[PROGRESS_ENV] = "1"
    if args.netns or args.netns_bandwidth:
        from ..units import parse_bandwidth
        from .netns import run_in_netns

        try:
            bandwidth = parse_bandwidth(args.netns_bandwidth or plans[0].scenario.network.bandwidth)
        except ValueError as error:
            raise ScenarioError(f"--netns-bandwidth {args.netns_bandwidth!r}: {error}") from None
        return run_in_netns(n_ranks, argv, bandwidth, threads, limit)
    if args.json or all(scenario.cluster.profile is not None for _, scenario in variants):
        return run_job(command, env, limit)
    with tempfile.TemporaryDirectory() as folder:  # rank 0 writes each generation's measured tokens/s here
        measured_file = Path(folder) / "measured.jsonl"
        env[MEASURED_ENV] = str(measured_file)
        code = run_job(command, env, limit)
        measured = [json.loads(line) for line in measured_file.read_text().splitlines()] if code == 0 and \
            measured_file.is_file() else []
    for (_label, scenario), tokens_per_s in zip(variants, measured, strict=False):
        note = uncalibrated_note(scenario, tokens_per_s)
        if note:
            print(note, flush=True)
    return code



PROGRESS_ENV = "PIPESIM_PROGRESS"  # the front end is at a terminal
MEASURED_ENV = "PIPESIM_MEASURED_FILE"  # rank 0 appends each generation's measured tokens/s (JSON lines)
PREDICTION_TIMEOUT_S = 60.0


def uncalibrated_note(scenario, measured: float | None) -> str | None:
    """One line for a scenario whose node figures are not from a calibrated profile: how far the simulator's
    prediction is from ``measured`` (None when calibrated, or when either number is missing). The prediction is
    ``pipesim simulate`` in its own process (the executor package never imports the simulator), bounded in time."""
    if scenario.cluster.profile is not None or not measured:
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scenario.yaml"
        path.write_text(yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False))
        try:
            done = subprocess.run([sys.executable, "-m", "pipesim.cli", "simulate", str(path), "--json"],
                                  capture_output=True, text=True, timeout=PREDICTION_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return None
    if done.returncode != 0:
        return None
    predicted = json.loads(done.stdout.strip().splitlines()[-1]).get("tokens_per_s")
    if not predicted:
        return None
    side = "above" if predicted > measured else "below"
    return (f"note: the scenario's node figures are not calibrated: the simulator predicts {predicted:.4g} tokens/s "
            f"for it, {abs(predicted / measured - 1):.0%} {side} this measurement; `pipesim calibrate` fits them to "
            f"this machine")
