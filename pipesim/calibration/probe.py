"""Microbenchmarks on the executor's own ranks (run under mpiexec or srun, one rank per node).

Every rank times its own pipeline stage over a grid of (tokens in the run, context length), built exactly as the
executor builds it (real torch layers, or emulated sleeps); the last rank also times its stage with the output
head; the head times greedy sampling of returned predictions and the draft's steps; every pair of neighbouring
ranks (the ring the pipeline uses) plays message ping-pong over several sizes, spinning (the transport alone).
Ranks that share a host take turns for the stage grid (the others wait in a sleeping barrier), so the samples are
solo costs; then every rank of such a host times a few runs while its host-mates compute too, which gives the
node's concurrent slowdown. Each rank also times how late a short sleep ends (its polling reacts that much
later). Finally a short iterative generation is measured (three times; the median one counts), so the front end
can attribute what the microbenchmarks miss (messaging, scheduling) to a per-run dispatch time. Rank 0 writes all
raw samples as JSON.

    mpiexec -n N python -m pipesim.calibration.probe SCENARIO --out raw.json [--set ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..cli_args import OneLineParser, check_output_file, int_at_least
from ..executor import lifeline
from ..metrics import median_by_throughput

DEFAULT_TOKENS = (1, 2, 4, 8, 16)
DEFAULT_CONTEXTS = (0, 64, 192, 448)
LINK_SIZES = (64, 4096, 65536, 524288, 2097152)
ITERATIVE_REPEATS = 3  # measured iterative generations; the median one gives the per-run dispatch


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- stages ------------------------------------------------------------------------------------------

CONCURRENT_POINTS = ((1, 64), (4, 64), (16, 64))  # (tokens, context) timed alone and with host-mates busy


def _real_stage_runner(plan, rank: int, capacity: int) -> Callable[[int, int], None]:
    """One timed call: a run of n tokens at context c through this rank's stage (no output head)."""
    import torch

    from ..executor.torch_backend import set_threads

    set_threads(plan.executor.threads_per_rank)
    start, end = plan.layer_ranges[rank]
    stage = _store(plan, rank).stage(plan.target, start, end, rank == 0, False)
    kv = stage.make_kv_cache(capacity, 1)
    generator = torch.Generator().manual_seed(4321 + rank)
    d_model, vocab = stage.config.d_model, stage.config.vocab_size
    filled = [0]

    def run(n: int, context: int) -> None:
        kv.seq_rm(0, min(filled[0], context))
        filled[0] = min(filled[0], context)
        while filled[0] < context:  # grow the cached context (these calls are part of the work, not timed apart)
            chunk = min(64, context - filled[0])
            _forward(stage, kv, filled[0], chunk, d_model, vocab, generator)
            filled[0] += chunk
        _forward(stage, kv, context, n, d_model, vocab, generator)
        kv.seq_rm(0, context)

    return run


def _concurrent_samples(comm, rank: int, mates: Sequence[int], run: Callable[[int, int], None], repeats: int,
                        poll: float) -> dict[str, list[dict]]:
    """Times of CONCURRENT_POINTS alone (host-mates take turns) and with every host-mate computing as well.

    For the concurrent times each rank keeps computing (untimed) after its own timed repeats until every mate
    is done, so no timed call runs alone. Collective over ``comm``; ranks without host-mates only take part in
    the barriers.
    """
    alone: list[dict] = []
    together: list[dict] = []

    def time_alone() -> None:
        for n, context in CONCURRENT_POINTS:
            run(n, context)  # warm-up (and the context is built)
            seconds = _median_time(lambda n=n, context=context: run(n, context), repeats)
            alone.append({"n_tokens": n, "context": context, "seconds": seconds})

    _in_turns(comm, rank, mates, poll, time_alone if mates else lambda: None)
    for n, context in CONCURRENT_POINTS:
        if mates:
            run(n, context)
        _sleeping_barrier(comm, poll)
        times = []
        if mates:
            for _ in range(repeats):
                begin = time.perf_counter()
                run(n, context)
                times.append(time.perf_counter() - begin)
        request = comm.Ibarrier()
        while mates and not request.Test():
            run(n, context)  # keep the host busy while a mate is still timing
        _wait(request, poll)
        if mates:
            together.append({"n_tokens": n, "context": context, "seconds": statistics.median(times)})
    return {"alone": alone, "together": together}


def _sleep_overshoot(first: float, longest: float, repeats: int = 40) -> float:
    """Median time a sleep of the polling schedule (first, 2·first, ... longest) ends late (timer slack and
    wake-up): a waiting rank reacts that much later than its sleeps say."""
    lengths = []
    sleep = first
    while sleep < longest:
        lengths.append(sleep)
        sleep = min(2 * sleep, longest)
    lengths.append(longest)
    late = []
    for _ in range(repeats):
        for sleep in lengths:
            start = time.perf_counter()
            time.sleep(sleep)
            late.append(time.perf_counter() - start - sleep)
    return max(0.0, statistics.median(late))


def _in_turns(comm, rank: int, mates: Sequence[int], poll: float, work: Callable[[], None]) -> None:
    """Ranks that share a host call ``work`` one after another while the others sleep in a barrier; a rank alone
    on its host calls it in the first turn. Collective over ``comm``."""
    from mpi4py import MPI

    for turn in range(max(1, comm.allreduce(len(mates), op=MPI.MAX))):
        if (not mates and turn == 0) or (turn < len(mates) and mates[turn] == rank):
            work()
        _sleeping_barrier(comm, poll)


def _sleeping_barrier(comm, poll: float) -> None:
    """A barrier whose waiting ranks sleep (MPI_Barrier may spin and steal a core from a rank being timed)."""
    _wait(comm.Ibarrier(), poll)


def _wait(request, poll: float, limit: float = 600.0) -> None:
    deadline = time.monotonic() + limit
    pause = min(50e-6, poll)
    while not request.Test():
        if time.monotonic() > deadline:
            raise TimeoutError(f"probe: a barrier did not complete in {limit:.0f} s")
        time.sleep(pause)
        pause = min(2 * pause, poll)


def _host_mates(comm, rank: int) -> list[int]:
    """Ranks on this rank's host (itself included), or [] when it has the host to itself."""
    from mpi4py import MPI

    hosts = comm.allgather(MPI.Get_processor_name())
    mates = [r for r, host in enumerate(hosts) if host == hosts[rank]]
    return mates if len(mates) > 1 else []


def _real_stage_samples(plan, rank: int, tokens: Sequence[int], contexts: Sequence[int],
                        repeats: int) -> list[dict]:
    import torch

    from ..executor.torch_backend import set_threads

    set_threads(plan.executor.threads_per_rank)
    store = _store(plan, rank)
    start, end = plan.layer_ranges[rank]
    last = rank == plan.n_ranks - 1
    variants = [(store.stage(plan.target, start, end, rank == 0, False), 0)]
    if last:
        variants.append((store.stage(plan.target, start, end, rank == 0, True), 1))
    samples = []
    capacity = max(contexts) + max(tokens) + 8
    generator = torch.Generator().manual_seed(1234 + rank)
    for stage, with_head in variants:
        kv = stage.make_kv_cache(capacity, 1)
        d_model = stage.config.d_model
        vocab = stage.config.vocab_size
        filled = 0
        for context in sorted(contexts):
            while filled < context:  # grow the cached context (untimed), in chunks
                chunk = min(64, context - filled)
                _forward(stage, kv, filled, chunk, d_model, vocab, generator)
                filled += chunk
            for n in tokens:
                def run(n=n, context=context, stage=stage, kv=kv, d_model=d_model, vocab=vocab):
                    _forward(stage, kv, context, n, d_model, vocab, generator)
                    kv.seq_rm(0, context)
                run()  # warm-up
                seconds = _median_time(run, repeats)
                samples.append({"n_layers": end - start, "n_tokens": n, "context": context,
                                "n_outputs": n if with_head else 0, "seconds": seconds})
    return samples


def _store(plan, rank: int):
    """A model store on ``executor.device`` (GPU ``rank mod count``: the executor's choice when a host's ranks are
    numbered contiguously, as ``mpiexec -n`` on one host does)."""
    from ..executor.device import resolve_device
    from ..executor.torch_backend import ModelStore

    return ModelStore(resolve_device(plan.executor.device, rank))


def _forward(stage, kv, position: int, n: int, d_model: int, vocab: int, generator) -> None:
    """One run through ``stage`` from host inputs, as the executor's stages run it (copied to the device, the
    result copied back, so a GPU's time is waited for)."""
    import torch

    if stage.has_embedding:
        inputs = torch.randint(0, vocab, (n,), generator=generator)
    else:
        inputs = torch.randn((n, d_model), generator=generator)
    positions = torch.arange(position, position + n, dtype=torch.int64)
    out = stage(inputs, positions, torch.ones((n, 1), dtype=torch.bool), kv)
    out.cpu()


def _emulated_stage_samples(plan, rank: int, clock_now, tokens: Sequence[int], contexts: Sequence[int],
                            repeats: int) -> list[dict]:
    from ..executor.emulation import EmulatedStage
    from ..executor.protocol import RunMessage
    from ..world.build import build_world

    scenario = plan.scenario
    world = build_world(scenario)
    start, end = plan.layer_ranges[rank]
    last = rank == plan.n_ranks - 1
    stage = EmulatedStage(world.nodes[rank], world.target.cost, end - start, last, world.tokens,
                          scenario.head.return_mode, scenario.head.top_k, clock_now)
    samples = []
    for context in contexts:
        for n in tokens:
            message = RunMessage(1, tuple([1] * n), tuple(range(context, context + n)), (0,), 0, ())
            seconds = _median_time(lambda m=message: stage.forward(m, None), repeats)
            samples.append({"n_layers": end - start, "n_tokens": n, "context": context,
                            "n_outputs": n if last else 0, "seconds": seconds})
    return samples


def _emulated_stage_runner(plan, rank: int, clock_now) -> Callable[[int, int], None]:
    """One call of the emulated stage (a modelled sleep) for the concurrency measurement."""
    from ..executor.emulation import EmulatedStage
    from ..executor.protocol import RunMessage
    from ..world.build import build_world

    scenario = plan.scenario
    world = build_world(scenario)
    start, end = plan.layer_ranges[rank]
    stage = EmulatedStage(world.nodes[rank], world.target.cost, end - start, False, world.tokens,
                          scenario.head.return_mode, scenario.head.top_k, clock_now)

    def run(n: int, context: int) -> None:
        stage.forward(RunMessage(1, tuple([1] * n), tuple(range(context, context + n)), (0,), 0, ()), None)

    return run


# -- head ----------------------------------------------------------------------------------------------

def _sampling_samples(vocab: int, repeats: int) -> list[dict]:
    """Greedy sampling of returned logits (what the head does with every returned run)."""
    rng = np.random.default_rng(0)
    samples = []
    for m in (1, 2, 4, 8):
        logits = rng.standard_normal((m, vocab)).astype(np.float32)
        seconds = _median_time(lambda x=logits: [int(v) for v in x.argmax(axis=1)], repeats * 4)
        samples.append({"n_outputs": m, "seconds": seconds})
    return samples


def _draft_samples(plan, clock_now, repeats: int) -> list[dict]:
    """Draft steps as the executor's head runs them (emulated sleeps, a real draft model, or free)."""
    scenario, ex = plan.scenario, plan.executor
    if scenario.models.draft is None and ex.draft_model is None:
        return []
    capacity = 1024
    if ex.draft == "model" or ex.oracle_cost == "model":
        if plan.draft is None:
            return []
        from ..executor.torch_backend import ModelRunner

        runner = ModelRunner(_store(plan, 0).full_model(plan.draft), capacity)
        vocab = plan.draft.vocab_size
    elif ex.oracle_cost == "emulated":
        from ..executor.drafts import EmulatedRunner
        from ..world.build import build_world

        world = build_world(scenario)
        if world.draft_cost is None:
            return []
        runner = EmulatedRunner(world.draft_cost, world.nodes[0], clock_now)
        vocab = scenario.models.draft_spec().vocab_size
    else:
        return []
    samples = []
    rng = np.random.default_rng(1)
    for context in (1, 64, 256):
        for n in (1, 4, 16):
            base = [int(t) for t in rng.integers(0, vocab, context)]
            runner.rewind(base + [0])
            runner.feed(base[len(runner.cached):] or base[-1:])

            def step(n=n, base=base):
                runner.rewind(base + [0])
                runner.feed([int(t) for t in rng.integers(0, vocab, n)])

            seconds = _median_time(step, repeats)
            samples.append({"n_tokens": n, "context": context, "seconds": seconds})
    return samples


# -- links ---------------------------------------------------------------------------------------------

def _ping_pong(comm, rank: int, a: int, b: int, repeats: int) -> list[dict]:
    """One-way times between ranks a and b (half the round trip), both spinning on Iprobe: the transport alone
    (MPI and the copies). How late an idle rank notices a message is its polling, which the simulator models
    apart (``PollBackoff``). Only ranks a and b call this; the first exchange of every size is a warm-up."""
    samples = []
    for size in LINK_SIZES:
        buffer = np.zeros(size, dtype=np.uint8)
        times = []
        for i in range(repeats + 1):
            if rank == a:
                start = time.perf_counter()
                comm.Send(buffer, dest=b, tag=77)
                _spin_recv(comm, buffer, b)
                if i:
                    times.append((time.perf_counter() - start) / 2)
            else:
                _spin_recv(comm, buffer, a)
                comm.Send(buffer, dest=a, tag=77)
        if rank == a:
            samples.append({"nbytes": size, "seconds": statistics.median(times)})
    return samples


def _spin_recv(comm, buffer, source: int, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not comm.Iprobe(source=source, tag=77):
        if time.monotonic() > deadline:
            raise TimeoutError(f"ping-pong: nothing from rank {source} in {limit:.0f} s")
    comm.Recv(buffer, source=source, tag=77)


# -- relayed KV transactions (PipeInfer's reference) ----------------------------------------------------------

KV_CONTEXT = 64  # cached positions while the burst runs (every sequence holds them, as the reference's mirroring)


def kv_transaction_burst(n_partitions: int, context: int = KV_CONTEXT) -> list:
    """The burst the probe relays: what the reference issues around one verification of a speculative run in
    partition 1 that commits positions ``[1, context - 1)`` (``reference_kv_transaction_ops``: ``verify``, then
    ``nonspec_before`` and ``nonspec_after`` of the next token), ``4 * n_partitions + 8`` transactions."""
    from ..scheduling.strategies.pipeinfer import reference_kv_transaction_ops

    q = context - 1
    return [*reference_kv_transaction_ops("verify", (1, 1, q), n_partitions),
            *reference_kv_transaction_ops("nonspec_before", (q,), n_partitions),
            *reference_kv_transaction_ops("nonspec_after", (q,), n_partitions)]


def _kv_apply(plan, rank: int, max_seqs: int, capacity: int) -> Callable:
    """How this rank applies a transaction: real compute, to a KV cache of this rank's stage shaped as the
    executor's (``max_seqs`` sequences; ``KV_CONTEXT`` cells held by every sequence); emulated, not at all."""
    if not plan.real:
        return lambda ops: None
    import torch

    from ..executor.torch_backend import apply_kv_op, set_threads, synchronize

    set_threads(plan.executor.threads_per_rank)
    start, end = plan.layer_ranges[rank]
    stage = _store(plan, rank).stage(plan.target, start, end, rank == 0, rank == plan.n_ranks - 1)
    kv = stage.make_kv_cache(capacity, max_seqs)
    n = min(KV_CONTEXT, capacity)
    kv.assign(torch.arange(n), torch.arange(n), torch.ones((n, max_seqs), dtype=torch.bool))

    def apply(ops) -> None:
        for op in ops:
            apply_kv_op(kv, op)
        synchronize(kv.k.device)

    return apply


def _kv_transaction_samples(comm, plan, rank: int, clock_now, poll: float, repeats: int) -> dict[str, Any]:
    """Every rank's time per relayed KV transaction: ``repeats`` bursts (``kv_transaction_burst``) relayed rank 0
    -> 1 -> ... -> last through the executor's own messaging and relay code (``kv_relay.time_relay_burst``);
    the median over bursts of this rank's busy time / transactions. Collective over ``comm``."""
    from ..executor.clock import Clock
    from ..executor.kv_relay import time_relay_burst
    from ..executor.messaging import Messenger

    scenario = plan.scenario
    n_partitions = scenario.strategy.n_partitions
    ops = kv_transaction_burst(n_partitions)
    capacity = (scenario.workload.prompt_tokens + scenario.workload.generate_tokens
                + plan.executor.kv_headroom)
    apply = _kv_apply(plan, rank, n_partitions * scenario.strategy.n_parallel + 2, max(capacity, KV_CONTEXT))
    data = comm.Dup()
    messenger = Messenger(data, Clock(clock_now), plan.node_names, [], None, poll)
    deadline = time.monotonic() + plan.executor.timeout_s
    size = comm.Get_size()
    bursts = []
    for _ in range(repeats + 1):  # the first burst is a warm-up
        _sleeping_barrier(comm, poll)
        bursts.append(time_relay_burst(messenger, ops, apply, rank - 1 if rank else None,
                                       rank + 1 if rank + 1 < size else None, deadline))
    messenger.drain(deadline)
    data.Free()
    per = [b["busy_s"] / b["n"] for b in bursts[1:]]
    return {"n": len(ops), "n_partitions": n_partitions, "bursts": bursts[1:],
            "seconds_per_transaction": statistics.median(per)}


def _median_run(runs: list[dict]) -> dict | None:
    """The generation of median throughput, or None when there was none."""
    return median_by_throughput(runs, lambda run: run["metrics"]) if runs else None


# -- main ----------------------------------------------------------------------------------------------

def run_probe(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m pipesim.calibration.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario")
    parser.add_argument("--out", required=True, type=check_output_file, help="raw samples JSON (written by rank 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int_at_least(1), default=5)
    parser.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)))
    parser.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)))
    parser.add_argument("--iterative-tokens", type=int_at_least(0), default=32,
                        help="tokens of the measured iterative generation (0: skip it)")
    args = parser.parse_args(argv)
    from mpi4py import MPI

    from ..executor.messaging import MIN_SLEEP
    from ..executor.plan import make_plan
    from ..scenario import ScenarioError, load_scenario

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    lifeline.watch(rank)  # never outlive the job (its parent or the calibrate launcher)
    problem = None
    try:
        scenario = load_scenario(args.scenario, [*args.set, "strategy.name=iterative"])
        plan = make_plan(scenario, size)
        if plan.draft_rank is not None:
            raise ValueError(f"placement.draft_node={plan.draft_rank}: calibration profiles every rank as a target "
                             "stage and the draft on the head (use --set placement.draft_node=0 and an even "
                             "placement.layer_split)")
        tokens = [int(t) for t in args.tokens.split(",")]
        contexts = [int(c) for c in args.contexts.split(",")]
    except (ScenarioError, ValueError, OSError) as error:
        problem = str(error)
    problems = comm.allgather(problem)
    if any(problems):
        if rank == 0:
            print(f"pipesim calibrate: error: {next(p for p in problems if p)}", file=sys.stderr, flush=True)
        return 2
    try:
        if plan.executor.pin_ranks:
            from ..executor.affinity import local_rank, pin_to_core

            pin_to_core(local_rank(comm), width=plan.executor.threads_per_rank)
        clock_now = MPI.Wtime
        poll = plan.executor.poll_interval_s
        mates = _host_mates(comm, rank)
        stage: list[dict] = []

        def time_stage() -> None:
            stage.extend(_real_stage_samples(plan, rank, tokens, contexts, args.repeats) if plan.real
                         else _emulated_stage_samples(plan, rank, clock_now, tokens, contexts, args.repeats))

        _in_turns(comm, rank, mates, poll, time_stage)
        runner = (_real_stage_runner(plan, rank, max(c for _, c in CONCURRENT_POINTS) + 64) if plan.real
                  else _emulated_stage_runner(plan, rank, clock_now))
        concurrent = _concurrent_samples(comm, rank, mates, runner, args.repeats, poll)
        head: dict[str, Any] = {}
        if rank == 0:
            vocab = plan.target.vocab_size if plan.real else scenario.models.target_spec().vocab_size
            head = {"sampling": _sampling_samples(vocab, args.repeats),
                    "draft": _draft_samples(plan, clock_now, args.repeats)}
        links: dict[str, list[dict]] = {}
        for a in range(size):
            b = (a + 1) % size
            if a == b:
                continue
            if rank in (a, b):  # the pair spins; the other ranks sleep, so they do not take its cores
                samples = _ping_pong(comm, rank, a, b, max(args.repeats, 5))
                if rank == a:
                    links[f"{plan.node_names[a]}->{plan.node_names[b]}"] = samples
            _sleeping_barrier(comm, poll)
        if rank == 0:
            print("calibrate: timing relayed KV transactions (PipeInfer's reference bookkeeping)",
                  file=sys.stderr, flush=True)
        kv_transactions = _kv_transaction_samples(comm, plan, rank, clock_now, poll, min(args.repeats, 3))
        report = {"rank": rank, "node": plan.node_names[rank], "host": MPI.Get_processor_name(),
                  "kv_transactions": kv_transactions,
                  "stage": stage, "host_mates": mates, "concurrent": concurrent, "links": links,
                  "sleep_overshoot": _sleep_overshoot(MIN_SLEEP, poll), **head}
        reports = comm.gather(report, root=0)
        measured: dict[str, Any] = {}
        if args.iterative_tokens > 0:
            from ..executor.runtime import RankRuntime

            runtime = RankRuntime(comm, MPI.Wtime)
            runtime.sync(plan.executor.timeout_s)
            # iterative: what the microbenchmarks miss per run; speculative: draft steps and sampling in situ
            # the iterative generation ITERATIVE_REPEATS times: a shared machine's speed moves between runs, and
            # the one of median throughput counts
            strategies = ["iterative"] * ITERATIVE_REPEATS + (["speculative"] if scenario.models.draft is not None
                                                              else [])
            for strategy in strategies:
                generation = load_scenario(args.scenario, [*args.set, f"strategy.name={strategy}",
                                                           "executor.link_emulation=false",
                                                           f"workload.generate_tokens={args.iterative_tokens}"])
                result = runtime.generate(make_plan(generation, size))
                if rank == 0:
                    measured.setdefault(strategy, []).append({"metrics": result.metrics,
                                                              "trace": result.trace.to_json()})
        if rank == 0:
            raw = {"format": "pipesim-calibration-raw/1", "scenario": str(args.scenario), "sets": args.set,
                   "n_ranks": size, "real": plan.real, "model": plan.executor.model if plan.real else None,
                   "threads_per_rank": plan.executor.threads_per_rank, "repeats": args.repeats,
                   "poll": {"first": MIN_SLEEP, "longest": poll},
                   "ranks": reports, "iterative": _median_run(measured.get("iterative", [])),
                   "iterative_tokens_per_s": [m["metrics"]["tokens_per_s"] for m in measured.get("iterative", [])],
                   "speculative": _median_run(measured.get("speculative", []))}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(raw))
        return 0
    except BaseException as error:  # noqa: BLE001 - a failing rank must end the job
        print(f"rank {rank}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        traceback.print_exc(file=sys.stderr)
        comm.Abort(1)
        return 1


if __name__ == "__main__":
    sys.exit(run_probe())
