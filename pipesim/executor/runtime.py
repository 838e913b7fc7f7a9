"""One rank of an executor job: clock sync, then each generation, then the gathered trace on rank 0.

A generation goes: rank 0 sends every other rank a SETUP (KV cache size), each rank loads its stage and answers
READY, rank 0 tells the other pipelines' heads to GO (a PipeSpec chain has one pipeline per model); each
pipeline's head runs its strategy through the shared driver, every other rank its stage; at the end every rank
drains its messages and sends its records to rank 0, which shifts them into its own clock and builds the trace
and metrics. One-model strategies and chains take the same path: a chain is only more pipelines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..metrics import clean_for_json, compute_metrics
from ..scenario import Scenario
from ..scheduling import make_strategies
from ..scheduling.strategies import full_cancelled_traffic
from ..trace import Record, Trace
from ..world.acceptance import SyntheticTokens, level_predictor
from ..world.build import World, build_world
from ..world.profile import kv_transaction_time
from .affinity import local_rank
from .backend import StageBackend
from .clock import Clock, sync_clocks
from .drafts import Drafter, EmulatedRunner, FreeRunner, ReferenceTokens
from .emulation import EmulatedStage, LinkEmulator
from .errors import ExecutorTimeout
from .head import Head
from .messaging import Messenger
from .plan import Plan
from .protocol import TAG_GO, TAG_READY, TAG_RECORDS, TAG_SETUP
from .remote_draft import DraftServer, RemoteDrafter
from .worker import FullTraffic, Worker


@dataclass
class GenerationResult:
    """The measured trace of one generation and its metrics (with ``output_tokens`` and ``output_text``)."""

    trace: Trace
    metrics: dict[str, Any]


@dataclass
class _HeadSetup:
    """What a pipeline's head needs beyond its stage."""

    prompt: list[int]
    tokenizer: Any
    stop_tokens: tuple[int, ...]
    reference: list[int] | None
    drafter: Drafter | None = None
    verify_sleep: float = 0.0
    early_oracle: Any = None
    predict: Any = None
    oracle: Any = None  # the draft oracle's proposals, for a draft on a rank of its own


def _wait_for(comm, source: int, tag: int, deadline: float, what: str, poll: float) -> None:
    while not comm.Iprobe(source=source, tag=tag):
        if time.monotonic() > deadline:
            raise ExecutorTimeout(f"timed out waiting for {what} from rank {source}")
        time.sleep(poll)


class RankRuntime:
    """Everything one rank keeps across the generations of a job: its clock and loaded models."""

    def __init__(self, comm, wtime) -> None:
        self.comm = comm  # control messages: clock sync, SETUP/READY, records
        self.data_comm = comm.Dup()  # the generation's messages, so probing them never meets a control message
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.clock = Clock(wtime)
        self.local_rank = local_rank(comm)  # picks this rank's GPU (and core, with executor.pin_ranks)
        self.offsets = [0.0] * self.size
        self._stores: dict[str, Any] = {}  # real compute: the models loaded, per executor.device setting
        self._references: dict[tuple, list[int]] = {}
        self.progress = None  # rank 0 of an interactive run: told the committed tokens as they grow

    def sync(self, timeout_s: float) -> None:
        """Estimate clock offsets (the head learns all, each worker its own)."""
        offsets = sync_clocks(self.comm, self.clock, time.monotonic() + timeout_s)
        if self.rank == 0:
            self.offsets = offsets

    def generate(self, plan: Plan) -> GenerationResult | None:
        """Run one generation; rank 0 returns its result, the other ranks None."""
        deadline = time.monotonic() + plan.executor.timeout_s
        comm, ex, scenario = self.comm, plan.executor, plan.scenario
        poll, rank = ex.poll_interval_s, self.rank
        world = build_world(scenario)
        if rank == plan.draft_rank:
            return self._serve_draft(plan, world, deadline)
        level = plan.level_of(rank)
        level_heads = [lv.ranks[0] for lv in plan.pipelines]
        is_head = rank == level.ranks[0]
        if level.model is not None:  # load the stage while rank 0 prepares (the KV cache size comes with SETUP)
            j = level.ranks.index(rank)
            start, end = level.layer_ranges[j]
            self._models(plan).stage(level.model, start, end, j == 0, j == len(level.ranks) - 1)
        prompt = tokenizer = store = None
        if is_head:
            prompt, tokenizer, store = self._head_setup(plan)
        setup = np.zeros(2, dtype=np.int64)
        if rank == 0:
            capacity = world.kv_capacity(len(prompt))
            for peer in range(1, self.size):
                comm.Send(np.asarray([capacity, plan.max_seqs], dtype=np.int64), dest=peer, tag=TAG_SETUP)
        else:
            _wait_for(comm, 0, TAG_SETUP, deadline, "SETUP", poll)
            comm.Recv(setup, source=0, tag=TAG_SETUP)
            capacity = int(setup[0])
        backend = self._stage_backend(plan, world, capacity)
        parts = self._head_parts(plan, world, level, prompt, tokenizer, store, capacity) if is_head else None
        flag = np.ones(1, dtype=np.int64)
        if rank == 0:
            for peer in range(1, self.size):
                _wait_for(comm, peer, TAG_READY, deadline, "READY (stage loaded)", poll)
                comm.Recv(flag, source=peer, tag=TAG_READY)
            for peer in level_heads[1:]:
                comm.Send(flag, dest=peer, tag=TAG_GO)
        else:
            comm.Send(flag, dest=0, tag=TAG_READY)
            if is_head:
                _wait_for(comm, 0, TAG_GO, deadline, "GO (every rank ready)", poll)
                comm.Recv(flag, source=0, tag=TAG_GO)

        records: list[Record] = []
        link = LinkEmulator(scenario, plan.node_names) if ex.link_emulation else None
        messenger = Messenger(self.data_comm, self.clock, plan.node_names, records, link, poll)
        if is_head and plan.draft_rank is not None and level.is_target:
            parts.drafter = RemoteDrafter(messenger, plan.draft_rank, parts.oracle, deadline)
        fault = ex.fault_rank == rank
        outcome = None
        kv_time = kv_transaction_time(world.profile, plan.node_names[rank], scenario.cluster.kv_transaction_time)
        kv_messages = scenario.executor.kv_transactions == "messages"
        if is_head:
            strategy = make_strategies(scenario.strategy.name, parts.prompt, scenario.workload.generate_tokens,
                                       scenario.strategy.params(), parts.stop_tokens, len(plan.pipelines),
                                       level.index if len(plan.pipelines) > 1 else None, capacity)[0]
            head = Head(strategy, level.ranks, level_heads, level.index, backend, parts.drafter, messenger,
                        self.clock, records, plan.node_names[rank], deadline, parts.verify_sleep, fault,
                        parts.early_oracle, parts.predict, kv_time, kv_messages)
            outcome = head.run(self.progress if level.is_target else None)
        else:
            Worker(rank, self.size, backend, messenger, self.clock, records, plan.node_names[rank], deadline,
                   fault=fault, pipeline=level.ranks, level=level.index,
                   kv_transaction_time=kv_time, full_traffic=self._full_traffic(scenario, world, level),
                   kv_messages=kv_messages).run()
        dropped = messenger.drain(deadline)
        if rank != 0:
            report = {"records": [tuple(r) for r in records], "kv_max_cells": getattr(backend, "max_cells", 0),
                      "kv_final_cells": backend.kv_cells(), "dropped": dropped}
            if outcome is not None and level.is_target:
                report["outcome"] = (outcome.output_tokens, outcome.t_start, outcome.t_end)
            self._send_report(report, deadline, poll)
            return None
        return self._trace(plan, parts, backend, records, outcome, dropped, capacity, deadline)

    # -- models ----------------------------------------------------------------------------------------
    def _models(self, plan: Plan):
        from .torch_backend import (  # real compute only: emulated ranks never load torch
            ModelStore,
            set_threads,
        )

        set_threads(plan.executor.threads_per_rank)
        setting = plan.executor.device
        if setting not in self._stores:
            from .device import resolve_device

            self._stores[setting] = ModelStore(resolve_device(setting, self.local_rank))
        return self._stores[setting]

    def _stage_backend(self, plan: Plan, world: World, capacity: int) -> StageBackend:
        """This rank's stage of its pipeline's model: real layers, or a modelled sleep (emulated compute, and the
        oracle drafts of a chain without executor.chain_models)."""
        rank, scenario = self.rank, plan.scenario
        level = plan.level_of(rank)
        j = level.ranks.index(rank)
        start, end = level.layer_ranges[j]
        first, last = j == 0, j == len(level.ranks) - 1
        if level.model is not None:
            from .torch_backend import TorchStage

            stage = self._models(plan).stage(level.model, start, end, first, last)
            early = self._early_exit_head(plan, stage) if plan.early_exit is not None else None
            return TorchStage(stage, capacity, plan.max_seqs, scenario.head.return_mode, scenario.head.top_k, early)
        return EmulatedStage(world.nodes[rank], world.pipelines[level.index].cost, end - start, last, world.tokens,
                             scenario.head.return_mode, scenario.head.top_k, self.clock.now, start)

    def _early_exit_head(self, plan: Plan, stage):
        """SPEED with real early exits, on the rank holding the exit layer: the exit head (else None)."""
        exit_layer = plan.scenario.strategy.exit_layer
        if plan.early_exit != "real" or not stage.layer_start <= exit_layer < stage.layer_end:
            return None
        from .torch_backend import EarlyExitHead, load_exit_adapter

        store = self._models(plan)
        n_layers = plan.target.n_layers
        head = stage if stage.has_output_head else store.stage(plan.target, n_layers, n_layers, False, True)
        adapter = None
        if plan.executor.exit_adapter is not None:
            adapter = load_exit_adapter(plan.executor.exit_adapter, exit_layer, head, plan.target.text)
        return EarlyExitHead(head, adapter)

    # -- head ------------------------------------------------------------------------------------------
    def _head_setup(self, plan: Plan) -> tuple[list[int], Any, Any]:
        """The prompt, the tokenizer and (real compute) the model store, before any worker is told to load."""
        scenario, ex = plan.scenario, plan.executor
        if not plan.real:
            return build_world(scenario).prompt(), None, None
        store = self._models(plan)
        tokenizer = store.tokenizer(plan.target)
        if ex.prompt is not None:
            prompt = tokenizer.encode_chat(ex.prompt) if ex.chat else tokenizer.encode(ex.prompt)
        else:
            tokens = SyntheticTokens(plan.target.vocab_size, scenario.workload.seed)
            prompt = [tokens.token(p) for p in range(scenario.workload.prompt_tokens)]
        if not prompt:
            raise ValueError(f"executor.prompt={ex.prompt!r} encodes to no tokens")
        return prompt, tokenizer, store

    def _head_parts(self, plan: Plan, world: World, level, prompt: list[int], tokenizer, store,
                    capacity: int) -> _HeadSetup:
        """A pipeline head's prompt, stop tokens, reference continuation, draft, and oracles."""
        scenario, ex = plan.scenario, plan.executor
        n_generate = scenario.workload.generate_tokens
        acceptance = world.acceptance(prompt_len=len(prompt))
        stop_tokens: tuple[int, ...] = ()
        if ex.stop_at_eos and tokenizer is not None and tokenizer.eos_id is not None:
            stop_tokens = (tokenizer.eos_id,)
        tokens, reference = world.tokens, None
        if not plan.real:
            reference = [tokens.token(p) for p in range(len(prompt), len(prompt) + n_generate)]
        elif plan.oracle:
            from .torch_backend import reference_continuation

            # a run verified at the end may check drafted tokens past the last one generated
            strategy = scenario.strategy
            knobs = strategy.chain_knobs()
            margin = max(strategy.gamma, strategy.micro_batch, knobs["lookahead"] + knobs["max_verify"]) + 2
            key = (plan.target.key, tuple(prompt), n_generate + margin, stop_tokens)
            if key not in self._references:
                self._references[key] = reference_continuation(store.full_model(plan.target), prompt,
                                                               n_generate + margin,
                                                               stop_tokens[0] if stop_tokens else None)
            truth = self._references[key]
            tokens = ReferenceTokens(prompt + truth, plan.target.vocab_size)
            reference = truth[:n_generate]
            if stop_tokens and stop_tokens[0] in reference:
                reference = reference[:reference.index(stop_tokens[0]) + 1]
        parts = _HeadSetup(prompt, tokenizer, stop_tokens, reference,
                           verify_sleep=0.0 if plan.real else world.verify_overhead)
        oracle = world.oracle_draft(acceptance, tokens)
        if plan.draft_rank is not None:  # the draft rank runs the draft (RemoteDrafter, once messaging is up)
            parts.oracle = oracle if ex.draft == "oracle" else None
        elif plan.uses_draft:
            if ex.draft == "model":
                from .torch_backend import ModelRunner

                parts.drafter = Drafter(ModelRunner(store.full_model(plan.draft), capacity))
            else:
                parts.drafter = Drafter(self._oracle_runner(plan, world, store, capacity), oracle)
        if plan.early_exit == "oracle":
            def early_oracle(position: int, previous: int | None) -> int:  # as the simulator: against the prefix
                on_target = previous is None or previous == tokens.token(position - 1)
                right = on_target and acceptance.correct(position, 0)
                return tokens.token(position) if right else tokens.wrong(position)

            parts.early_oracle = early_oracle
        if plan.chain and not level.is_target and plan.oracle:
            parts.predict = level_predictor(tokens, acceptance, world.pipelines[level.index].accuracy,
                                            max(p.accuracy for p in world.pipelines[:-1]))
        return parts

    def _oracle_runner(self, plan: Plan, world: World, store, capacity: int):
        cost = plan.executor.oracle_cost
        if cost == "none":
            return FreeRunner()
        if cost == "model":
            from .torch_backend import ModelRunner

            return ModelRunner(store.full_model(plan.draft), capacity)
        return EmulatedRunner(world.draft_cost, world.nodes[world.draft_node], self.clock.now)

    def _serve_draft(self, plan: Plan, world: World, deadline: float) -> None:
        """The draft's own rank: the SETUP/READY handshake, then the draft requests of the head until its stop,
        then its report (executor/remote_draft.py)."""
        comm, ex, rank = self.comm, plan.executor, self.rank
        setup = np.zeros(2, dtype=np.int64)
        _wait_for(comm, 0, TAG_SETUP, deadline, "SETUP", ex.poll_interval_s)
        comm.Recv(setup, source=0, tag=TAG_SETUP)
        capacity = int(setup[0])
        store = self._models(plan) if plan.real else None
        if not plan.uses_draft:
            runner = FreeRunner()
        elif ex.draft == "model":
            from .torch_backend import ModelRunner

            runner = ModelRunner(store.full_model(plan.draft), capacity)
        else:
            runner = self._oracle_runner(plan, world, store, capacity)
        comm.Send(np.ones(1, dtype=np.int64), dest=0, tag=TAG_READY)
        records: list[Record] = []
        link = LinkEmulator(plan.scenario, plan.node_names) if ex.link_emulation else None
        messenger = Messenger(self.data_comm, self.clock, plan.node_names, records, link, ex.poll_interval_s)
        DraftServer(runner, messenger, 0, self.clock, records, plan.node_names[rank], deadline,
                    rank if ex.fault_rank == rank else None).run()
        dropped = messenger.drain(deadline)
        self._send_report({"records": [tuple(r) for r in records], "kv_max_cells": 0, "kv_final_cells": 0,
                           "dropped": dropped}, deadline, ex.poll_interval_s)
        return None

    def _trace(self, plan: Plan, parts: _HeadSetup, backend, records, outcome, dropped, capacity, deadline):
        """Rank 0: every rank's records in its clock, the target's output, the trace and its metrics."""
        scenario, ex = plan.scenario, plan.executor
        target_head = plan.pipelines[-1].ranks[0]
        reports: dict[int, dict] = {}
        records, kv_max, kv_final, dropped = self._gather(backend, records, deadline, ex.poll_interval_s, dropped,
                                                          reports)
        if target_head == 0:
            output, t_end = outcome.output_tokens, outcome.t_end
        else:
            output, _t_start, t_end = reports[target_head]["outcome"]
            t_end -= self.offsets[target_head]
        # the simulator stops at Finish: work the stages still did afterwards is not part of the trace
        after_end = sum(1 for r in records if r.t0 > t_end)
        records = [r for r in records if r.t0 <= t_end]
        prompt, reference = parts.prompt, parts.reference
        meta = {
            "ranks": plan.n_ranks, "layer_ranges": plan.layer_ranges, "prompt_tokens": len(prompt), "prompt": prompt,
            "compute": ex.compute, "link_emulation": ex.link_emulation, "model": ex.model if plan.real else None,
            "draft": ex.draft, "oracle_cost": ex.oracle_cost if ex.draft == "oracle" else None,
            "early_exit": plan.early_exit, "threads_per_rank": ex.threads_per_rank, "device": ex.device,
            "pin_ranks": ex.pin_ranks, "clock_offsets": list(self.offsets), "kv_capacity": capacity,
            "kv_max_cells": kv_max, "kv_final_cells": kv_final, "max_partitions_used": outcome.max_partitions_used,
            "messages_dropped_at_end": dropped, "records_after_end": after_end, "reference_tokens": reference,
            "matches_reference": None if reference is None else list(output) == reference,
        }
        if plan.draft_rank is not None:
            meta["draft_node"] = plan.draft_rank
        if plan.chain:
            meta.update({
                "chain": [[spec.name for spec in scenario.models.chain_specs()]],
                "chain_nodes": [level.ranks for level in plan.levels],
                "chain_models": [level.model.text if level.model is not None else None for level in plan.levels],
                "chain_alphas": scenario.chain_alphas()})
        trace = Trace(engine="measured", strategy=scenario.strategy.name, scenario=scenario.name,
                      nodes=plan.node_names, t_start=outcome.t_start, t_end=t_end, records=records,
                      output_tokens=list(output), meta=meta)
        metrics = compute_metrics(trace)
        metrics["output_tokens"] = list(output)
        metrics["output_text"] = parts.tokenizer.decode(list(output)) if parts.tokenizer is not None else None
        return GenerationResult(trace, clean_for_json(metrics))

    def _gather(self, backend, records: list[Record], deadline: float, poll: float, dropped: int,
                reports: dict[int, dict] | None = None):
        """All ranks' records in the head's clock (sorted by start), and each stage's KV cell counts
        (``reports``, if given, receives each rank's whole report)."""
        kv_max = [getattr(backend, "max_cells", 0)]
        kv_final = [backend.kv_cells()]
        gathered = [Record._make(r) for r in records]  # the driver and the stage machine write plain tuples
        for peer in range(1, self.size):
            _wait_for(self.comm, peer, TAG_RECORDS, deadline, "the trace records", poll)
            report = self.comm.recv(source=peer, tag=TAG_RECORDS)
            if reports is not None:
                reports[peer] = report
            shift = self.offsets[peer]
            gathered.extend(Record(r[0], r[1] - shift, r[2] - shift, *r[3:]) for r in report["records"])
            kv_max.append(report["kv_max_cells"])
            kv_final.append(report["kv_final_cells"])
            dropped += report["dropped"]
        gathered.sort(key=lambda r: r.t0)
        return gathered, kv_max, kv_final, dropped

    @staticmethod
    def _full_traffic(scenario: Scenario, world: World, level) -> FullTraffic | None:
        """How a worker sends on runs it did not compute, when the strategy keeps their full traffic."""
        if not full_cancelled_traffic(scenario.strategy.name, scenario.strategy.params()):
            return None
        spec = world.pipelines[level.index].spec
        return FullTraffic(spec.d_model, spec.vocab_size, scenario.head.return_mode, scenario.head.top_k)

    def _send_report(self, report: dict, deadline: float, poll: float) -> None:
        request = self.comm.isend(report, dest=0, tag=TAG_RECORDS)
        while not request.Test():
            if time.monotonic() > deadline:
                raise ExecutorTimeout("timed out sending the trace records to the head")
            time.sleep(poll)
