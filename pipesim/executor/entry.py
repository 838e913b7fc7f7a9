"""The program every rank runs: ``mpiexec -n N python -m pipesim.executor SCENARIO ...`` (or under ``srun``).

Each rank loads and checks the scenario before anything else, and the ranks agree on the outcome: a bad scenario
(on any rank) is one error line from rank 0 and exit status 2 on every rank. Any failure later is printed as
``rank K: ExceptionType: message`` and ends the whole job with ``MPI_Abort``, so no rank is left waiting.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence

from ..cli_args import OneLineParser, int_at_least
from ..scenario import ScenarioError
from . import lifeline
from .affinity import pin_to_core
from .commands import MEASURED_ENV, PROGRESS_ENV
from .errors import ExecutorSetupError, InjectedFault
from .limits import check_memory
from .options import add_run_arguments, load_variants
from .output import print_result, save_traces, write_files
from .plan import make_plan

ABORT_GRACE_S = 0.3  # a failing rank's message reaches mpiexec's output before MPI_Abort ends the job


def _act_out_fault(plans, rank: int) -> None:
    """``executor.fault_action`` kill or stop: this rank dies or stops without a word (tests of fault handling)."""
    action = next((p.executor.fault_action for p in plans if p.executor.fault_rank == rank), "raise")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m pipesim.executor",
        description="One rank of the pipesim executor; start it with mpiexec -n N (or srun), one rank per node.")
    add_run_arguments(parser)
    parser.add_argument("--ranks", type=int_at_least(1), help="expected number of ranks (checked against the MPI job)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    lifeline.watch(rank)
    problem = None
    try:
        if args.ranks is not None and args.ranks != size:
            raise ExecutorSetupError(f"--ranks {args.ranks} but the MPI job has {size} ranks")
        variants = load_variants(args.scenario, args.set, args.strategy, args.variant, args.timeout)
        plans = [(label, make_plan(scenario, size)) for label, scenario in variants]
        check_memory([plan for _, plan in plans], [rank])  # this rank's share, on its host
    except (ScenarioError, ExecutorSetupError, ValueError, OSError) as error:
        problem = str(error)
    problems = comm.allgather(problem)  # every rank checked (files may differ between hosts): all stop, or none
    if any(p is not None for p in problems):
        if rank == 0:
            failing = next(k for k, p in enumerate(problems) if p is not None)
            where = "" if failing == 0 else f"rank {failing}: "
            print(f"pipesim run: error: {where}{problems[failing]}", file=sys.stderr, flush=True)
        return 2
    if rank == 0 and any(plan.real for _, plan in plans):
        print(f"pipesim run: loading the model and running {len(plans)} generation(s) on {size} ranks with real "
              f"compute (each bounded by executor.timeout_s); results follow as each generation ends",
              file=sys.stderr, flush=True)
    try:
        from .runtime import RankRuntime

        runtime = RankRuntime(comm, MPI.Wtime)
        pinned = None
        if any(plan.executor.pin_ranks for _, plan in plans):
            width = max(plan.executor.threads_per_rank for _, plan in plans)
            pinned = comm.allgather(pin_to_core(runtime.local_rank, width=width))  # each rank's first core
        runtime.sync(max(plan.executor.timeout_s for _, plan in plans))
        saved = []
        measured_file = os.environ.get(MEASURED_ENV)  # set by the `pipesim run` front end, for its note
        for index, (label, plan) in enumerate(plans):
            wall_start = time.time()  # the host's wall clock, so load samples taken outside the job line up
            bar = _progress_bar(rank, args.json, plan.scenario.workload.generate_tokens, label)
            runtime.progress = None if bar is None else (lambda n, bar=bar: bar.update(n - bar.n))
            try:
                result = runtime.generate(plan)
            finally:
                if bar is not None:
                    bar.close()
            if rank != 0:
                continue
            result.trace.meta["wall_clock"] = [wall_start, time.time()]
            result.trace.meta["pinned_cores"] = pinned
            print_result(result.metrics, label, args.json, scenario=plan.scenario)
            if measured_file:
                with open(measured_file, "a") as handle:
                    handle.write(json.dumps(result.metrics.get("tokens_per_s")) + "\n")
            write_files(result, index, len(plans), args.trace, args.records)
            if args.save_trace:
                saved.append({"variant": label, "metrics": result.metrics, "trace": result.trace.to_json()})
        if rank == 0 and args.save_trace:
            save_traces(args.save_trace, saved)
        return 0
    except BaseException as error:  # noqa: BLE001 - any failure must end the whole job
        if isinstance(error, InjectedFault):
            _act_out_fault([plan for _, plan in plans], rank)
        if os.environ.get("PIPESIM_TRACEBACK"):
            traceback.print_exc()
        # one write per line: ranks share the launcher's stderr, and print's separate newline let two ranks'
        # lines run together
        sys.stderr.write(f"rank {rank}: {type(error).__name__}: {error}\n")
        sys.stderr.flush()
        if size > 1:
            time.sleep(ABORT_GRACE_S)  # let mpiexec forward the message before the abort tears its pipes down
            comm.Abort(1)
        return 1


def _progress_bar(rank: int, as_json: bool, total: int, label: str):
    """A tokens bar on stderr for rank 0 of a run whose front end is at a terminal (never in logs or tests)."""
    if rank != 0 or as_json or not (sys.stderr.isatty() or os.environ.get(PROGRESS_ENV)):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"run{' ' + label if label else ''}: tokens", unit="tok", file=sys.stderr,
                leave=False)
