"""One rank of an executor job: clock sync, then each generation, then the gathered trace on the head.

A generation goes: the head sends each worker a SETUP (KV cache size), each worker loads its stage and answers
READY, the head starts its clock and runs the strategy; at the end every rank drains its messages, the workers
send their records to the head, which shifts them into its own clock and builds the trace and metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..metrics import clean_for_json, compute_metrics
from ..scheduling import make_strategy
from ..trace import Record, Trace
from ..world.acceptance import AcceptanceModel, OracleDraft, SyntheticTokens
from .affinity import local_rank
from .backend import StageBackend
from .clock import Clock, sync_clocks
from .drafts import Drafter, EmulatedRunner, FreeRunner, ReferenceTokens
from .emulation import EmulatedStage, LinkEmulator, cost_models, node_profiles
from .errors import ExecutorTimeout
from .head import Head
from .messaging import Messenger
from .plan import Plan
from .protocol import TAG_GO, TAG_READY, TAG_RECORDS, TAG_SETUP
from .worker import Worker


@dataclass
class GenerationResult:
    """The measured trace of one generation and its metrics (with ``output_tokens`` and ``output_text``)."""

    trace: Trace
    metrics: dict[str, Any]


@dataclass
class _HeadSetup:
    prompt: list[int]
    backend: StageBackend
    drafter: Drafter | None
    reference: list[int] | None
    tokenizer: Any
    stop_tokens: tuple[int, ...]
    verify_sleep: float
    early_oracle: Any = None


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

    def sync(self, timeout_s: float) -> None:
        """Estimate clock offsets (the head learns all, each worker its own)."""
        offsets = sync_clocks(self.comm, self.clock, time.monotonic() + timeout_s)
        if self.rank == 0:
            self.offsets = offsets

    def generate(self, plan: Plan) -> GenerationResult | None:
        """Run one generation; the head returns its result, workers None."""
        deadline = time.monotonic() + plan.executor.timeout_s
        if plan.chain:
            return self._chain(plan, deadline)
        return self._head(plan, deadline) if self.rank == 0 else self._worker(plan, deadline)

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

    def _stage_backend(self, plan: Plan, capacity: int, max_seqs: int) -> StageBackend:
        rank, n = self.rank, plan.n_ranks
        start, end = plan.layer_ranges[rank]
        scenario = plan.scenario
        if plan.real:
            from .torch_backend import TorchStage

            stage = self._models(plan).stage(plan.target, start, end, rank == 0, rank == n - 1)
            return TorchStage(stage, capacity, max_seqs, scenario.head.return_mode, scenario.head.top_k,
                              self._early_exit_head(plan, stage))
        tokens = SyntheticTokens(scenario.models.target_spec().vocab_size, scenario.workload.seed)
        return EmulatedStage(node_profiles(scenario)[rank], cost_models(scenario)[0], end - start, rank == n - 1,
                             tokens, scenario.head.return_mode, scenario.head.top_k, self.clock.now, start)

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
            tokens = SyntheticTokens(scenario.models.target_spec().vocab_size, scenario.workload.seed)
            return [tokens.token(p) for p in range(scenario.workload.prompt_tokens)], None, None
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

    def _head_parts(self, plan: Plan, prompt: list[int], tokenizer, store, capacity: int) -> _HeadSetup:
        scenario, ex = plan.scenario, plan.executor
        n_generate = scenario.workload.generate_tokens
        acc = scenario.acceptance
        acceptance = AcceptanceModel(acc.model, scenario.acceptance_alpha(), acc.alphas, acc.sequence,
                                     prompt_len=len(prompt), seed=acc.seed + 7919 * scenario.workload.seed)
        stop_tokens: tuple[int, ...] = ()
        if ex.stop_at_eos and tokenizer is not None and tokenizer.eos_id is not None:
            stop_tokens = (tokenizer.eos_id,)
        if not plan.real:
            spec = scenario.models.target_spec()
            synthetic = SyntheticTokens(spec.vocab_size, scenario.workload.seed)
            reference = [synthetic.token(p) for p in range(len(prompt), len(prompt) + n_generate)]
            oracle = OracleDraft(synthetic, acceptance)
            verify_sleep = cost_models(scenario)[2]
        else:
            from .torch_backend import reference_continuation

            reference = None
            truth: list[int] = []
            if plan.oracle:
                full = store.full_model(plan.target)
                # a run verified at the end may check drafted tokens past the last one generated
                margin = max(scenario.strategy.gamma, scenario.strategy.micro_batch) + 1
                key = (plan.target.key, tuple(prompt), n_generate + margin, stop_tokens)
                if key not in self._references:
                    self._references[key] = reference_continuation(full, prompt, n_generate + margin,
                                                                   stop_tokens[0] if stop_tokens else None)
                truth = self._references[key]
                reference = truth[:n_generate]
                if stop_tokens and stop_tokens[0] in reference:
                    reference = reference[:reference.index(stop_tokens[0]) + 1]
            oracle = OracleDraft(ReferenceTokens(prompt + truth, plan.target.vocab_size), acceptance)
            verify_sleep = 0.0
        backend = self._stage_backend(plan, capacity, plan.max_seqs)
        drafter = None
        if plan.uses_draft:
            if ex.draft == "model":
                from .torch_backend import ModelRunner

                drafter = Drafter(ModelRunner(store.full_model(plan.draft), capacity))
            else:
                drafter = Drafter(self._oracle_runner(plan, store, capacity), oracle)
        early_oracle = None
        if plan.early_exit == "oracle":
            def early_oracle(position: int) -> int:  # as the simulator: right where the draft oracle would be
                right = acceptance.correct(position, 0)
                return oracle.tokens.token(position) if right else oracle.tokens.wrong(position)
        return _HeadSetup(prompt, backend, drafter, reference, tokenizer, stop_tokens, verify_sleep, early_oracle)

    def _oracle_runner(self, plan: Plan, store, capacity: int):
        scenario, cost = plan.scenario, plan.executor.oracle_cost
        if cost == "none":
            return FreeRunner()
        if cost == "model":
            from .torch_backend import ModelRunner

            return ModelRunner(store.full_model(plan.draft), capacity)
        return EmulatedRunner(cost_models(scenario)[1], node_profiles(scenario)[0], self.clock.now)

    def _head(self, plan: Plan, deadline: float) -> GenerationResult:
        scenario, ex = plan.scenario, plan.executor
        comm, n = self.comm, plan.n_ranks
        poll = ex.poll_interval_s
        prompt, tokenizer, store = self._head_setup(plan)
        capacity = len(prompt) + scenario.workload.generate_tokens + ex.kv_headroom
        for peer in range(1, n):
            comm.Send(np.asarray([capacity, plan.max_seqs], dtype=np.int64), dest=peer, tag=TAG_SETUP)
        parts = self._head_parts(plan, prompt, tokenizer, store, capacity)
        ready = np.zeros(1, dtype=np.int64)
        for peer in range(1, n):
            _wait_for(comm, peer, TAG_READY, deadline, "READY (stage loaded)", poll)
            comm.Recv(ready, source=peer, tag=TAG_READY)

        records: list[Record] = []
        link = LinkEmulator(scenario, plan.node_names) if ex.link_emulation else None
        messenger = Messenger(self.data_comm, self.clock, plan.node_names, records, link, poll)
        strategy = make_strategy(scenario.strategy.name, prompt, scenario.workload.generate_tokens,
                                 scenario.strategy.params(), stop_tokens=parts.stop_tokens)
        head = Head(strategy, n, parts.backend, parts.drafter, messenger, self.clock, records, plan.node_names[0],
                    deadline, verify_sleep=parts.verify_sleep, fault=ex.fault_rank == 0,
                    early_oracle=parts.early_oracle)
        outcome = head.run()
        dropped = messenger.drain(deadline)

        records, kv_max, kv_final, dropped = self._gather(parts.backend, records, deadline, poll, dropped)
        # the simulator stops at Finish: work the stages still did afterwards is not part of the trace
        after_end = sum(1 for r in records if r.t0 > outcome.t_end)
        records = [r for r in records if r.t0 <= outcome.t_end]
        output, reference = outcome.output_tokens, parts.reference
        meta = {
            "ranks": n, "layer_ranges": plan.layer_ranges, "prompt_tokens": len(prompt), "prompt": prompt,
            "compute": ex.compute, "link_emulation": ex.link_emulation, "model": ex.model if plan.real else None,
            "draft": ex.draft, "oracle_cost": ex.oracle_cost if ex.draft == "oracle" else None,
            "early_exit": plan.early_exit,
            "threads_per_rank": ex.threads_per_rank, "device": ex.device, "pin_ranks": ex.pin_ranks,
            "clock_offsets": list(self.offsets),
            "kv_capacity": capacity, "kv_max_cells": kv_max, "kv_final_cells": kv_final,
            "max_partitions_used": outcome.max_partitions_used, "messages_dropped_at_end": dropped,
            "records_after_end": after_end, "reference_tokens": reference,
            "matches_reference": None if reference is None else output == reference,
        }
        trace = Trace(engine="measured", strategy=strategy.name, scenario=scenario.name, nodes=plan.node_names,
                      t_start=outcome.t_start, t_end=outcome.t_end, records=records, output_tokens=output,
                      meta=meta)
        metrics = compute_metrics(trace)
        metrics["output_tokens"] = list(output)
        metrics["output_text"] = tokenizer.decode(output) if tokenizer is not None else None
        return GenerationResult(trace, clean_for_json(metrics))

    def _gather(self, backend, records: list[Record], deadline: float, poll: float, dropped: int,
                reports: dict[int, dict] | None = None):
        """All ranks' records in the head's clock (sorted by start), and each stage's KV cell counts
        (``reports``, if given, receives each rank's whole report)."""
        kv_max = [getattr(backend, "max_cells", 0)]
        kv_final = [backend.kv_cells()]
        gathered = list(records)
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

    # -- PipeSpec chains -------------------------------------------------------------------------------
    def _chain_stage(self, plan: Plan, capacity: int) -> StageBackend:
        """This rank's stage of its level's model: real layers, or a modelled sleep (emulated compute, and
        oracle drafts without executor.chain_models)."""
        rank, scenario = self.rank, plan.scenario
        level = plan.level_of(rank)
        j = level.ranks.index(rank)
        start, end = level.layer_ranges[j]
        last = j == len(level.ranks) - 1
        if level.model is not None:
            from .torch_backend import TorchStage

            stage = self._models(plan).stage(level.model, start, end, j == 0, last)
            return TorchStage(stage, capacity, 1, scenario.head.return_mode, scenario.head.top_k)
        from ..world.costs import RooflineCostModel

        spec = scenario.models.chain_specs()[level.index]
        tokens = SyntheticTokens(scenario.models.target_spec().vocab_size, scenario.workload.seed)
        return EmulatedStage(node_profiles(scenario)[rank], RooflineCostModel(spec, scenario.models.kv_bytes),
                             end - start, last, tokens, scenario.head.return_mode, scenario.head.top_k,
                             self.clock.now, start)

    def _chain_head_parts(self, plan: Plan, level) -> tuple[list[int], Any, Any, tuple[int, ...], list[int] | None]:
        """(prompt, tokenizer, oracle predictor or None, stop tokens, reference) of a level head."""
        scenario, ex = plan.scenario, plan.executor
        prompt, tokenizer, store = self._head_setup(plan)
        n_generate = scenario.workload.generate_tokens
        stop_tokens: tuple[int, ...] = ()
        if ex.stop_at_eos and tokenizer is not None and tokenizer.eos_id is not None:
            stop_tokens = (tokenizer.eos_id,)
        if not plan.oracle or (level.is_target and self.rank != 0):  # the target's own predictions stand
            return prompt, tokenizer, None, stop_tokens, None
        if plan.real:
            from .torch_backend import reference_continuation

            margin = scenario.strategy.lookahead + scenario.strategy.max_verify + 2
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
        else:
            tokens = SyntheticTokens(scenario.models.target_spec().vocab_size, scenario.workload.seed)
            reference = [tokens.token(p) for p in range(len(prompt), len(prompt) + n_generate)]
        predictor = None
        if not level.is_target:  # the target's own predictions stand (real, or the synthetic truth)
            from .chain import oracle_predictor

            acc = scenario.acceptance
            acceptance = AcceptanceModel(acc.model, acc.alpha, acc.alphas, acc.sequence, prompt_len=len(prompt),
                                         seed=acc.seed + 7919 * scenario.workload.seed)
            predictor = oracle_predictor(tokens, acceptance.uniform, scenario.chain_alphas()[level.index])
        return prompt, tokenizer, predictor, stop_tokens, reference

    def _chain(self, plan: Plan, deadline: float) -> GenerationResult | None:
        """One generation of a PipeSpec chain on every rank (rank 0, level 0's head, gathers the trace)."""
        from .chain import ChainHead, make_level

        comm, ex, scenario = self.comm, plan.executor, plan.scenario
        poll, rank = ex.poll_interval_s, self.rank
        level = plan.level_of(rank)
        level_heads = [lv.ranks[0] for lv in plan.levels]
        is_head = rank == level.ranks[0]
        if level.model is not None:  # load the stage while rank 0 prepares
            j = level.ranks.index(rank)
            start, end = level.layer_ranges[j]
            self._models(plan).stage(level.model, start, end, j == 0, j == len(level.ranks) - 1)
        parts = self._chain_head_parts(plan, level) if is_head else None
        setup = np.zeros(2, dtype=np.int64)
        if rank == 0:
            capacity = len(parts[0]) + scenario.workload.generate_tokens + ex.kv_headroom
            for peer in range(1, self.size):
                comm.Send(np.asarray([capacity, 1], dtype=np.int64), dest=peer, tag=TAG_SETUP)
        else:
            _wait_for(comm, 0, TAG_SETUP, deadline, "SETUP", poll)
            comm.Recv(setup, source=0, tag=TAG_SETUP)
            capacity = int(setup[0])
        backend = self._chain_stage(plan, capacity)
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
        outcome = None
        fault = ex.fault_rank == rank
        if is_head:
            prompt, tokenizer, predictor, stop_tokens, reference = parts
            machine = make_level(level.index, len(plan.levels), prompt, scenario.workload.generate_tokens,
                                 scenario.strategy.params(), stop_tokens)
            head = ChainHead(machine, level.index, level.ranks, level_heads, backend, messenger, self.clock,
                             records, plan.node_names[rank], deadline, predictor, fault)
            outcome = head.run()
        else:
            Worker(rank, self.size, backend, messenger, self.clock, records, plan.node_names[rank], deadline,
                   fault=fault, pipeline=level.ranks).run()
        dropped = messenger.drain(deadline)
        if rank != 0:
            report = {"records": [tuple(r) for r in records], "kv_max_cells": getattr(backend, "max_cells", 0),
                      "kv_final_cells": backend.kv_cells(), "dropped": dropped}
            if outcome is not None and level.is_target:
                report["outcome"] = (outcome.output_tokens, outcome.t_start, outcome.t_end)
            self._send_report(report, deadline, poll)
            return None
        return self._chain_trace(plan, parts, backend, records, outcome, dropped, capacity, deadline)

    def _send_report(self, report: dict, deadline: float, poll: float) -> None:
        request = self.comm.isend(report, dest=0, tag=TAG_RECORDS)
        while not request.Test():
            if time.monotonic() > deadline:
                raise ExecutorTimeout("timed out sending the trace records to the head")
            time.sleep(poll)

    def _chain_trace(self, plan: Plan, parts, backend, records, outcome, dropped, capacity, deadline):
        scenario, ex = plan.scenario, plan.executor
        prompt, tokenizer, _predictor, _stop, reference = parts
        target_head = plan.levels[-1].ranks[0]
        reports: dict[int, dict] = {}
        records, kv_max, kv_final, dropped = self._gather(backend, records, deadline, ex.poll_interval_s, dropped,
                                                          reports)
        if target_head == 0:
            output, t_end = outcome.output_tokens, outcome.t_end
        else:
            output, _t_start, t_end = reports[target_head]["outcome"]
            t_end -= self.offsets[target_head]
        t_start = outcome.t_start
        after_end = sum(1 for r in records if r.t0 > t_end)
        records = [r for r in records if r.t0 <= t_end]
        meta = {
            "ranks": plan.n_ranks, "layer_ranges": plan.layer_ranges, "prompt_tokens": len(prompt), "prompt": prompt,
            "compute": ex.compute, "link_emulation": ex.link_emulation, "model": ex.model if plan.real else None,
            "chain": [[spec.name for spec in scenario.models.chain_specs()]],
            "chain_nodes": [level.ranks for level in plan.levels],
            "chain_models": [level.model.text if level.model is not None else None for level in plan.levels],
            "chain_alphas": scenario.chain_alphas(), "draft": ex.draft,
            "threads_per_rank": ex.threads_per_rank, "device": ex.device, "pin_ranks": ex.pin_ranks,
            "clock_offsets": list(self.offsets),
            "kv_capacity": capacity, "kv_max_cells": kv_max, "kv_final_cells": kv_final,
            "messages_dropped_at_end": dropped, "records_after_end": after_end, "reference_tokens": reference,
            "matches_reference": None if reference is None else list(output) == reference,
        }
        trace = Trace(engine="measured", strategy=scenario.strategy.name, scenario=scenario.name,
                      nodes=plan.node_names, t_start=t_start, t_end=t_end, records=records,
                      output_tokens=list(output), meta=meta)
        metrics = compute_metrics(trace)
        metrics["output_tokens"] = list(output)
        metrics["output_text"] = tokenizer.decode(list(output)) if tokenizer is not None else None
        return GenerationResult(trace, clean_for_json(metrics))

    # -- worker ----------------------------------------------------------------------------------------
    def _worker(self, plan: Plan, deadline: float) -> None:
        comm, ex = self.comm, plan.executor
        poll = ex.poll_interval_s
        if plan.real:  # load the stage while the head prepares (the KV cache size comes with SETUP)
            start, end = plan.layer_ranges[self.rank]
            self._models(plan).stage(plan.target, start, end, False, self.rank == plan.n_ranks - 1)
        setup = np.zeros(2, dtype=np.int64)
        _wait_for(comm, 0, TAG_SETUP, deadline, "SETUP", poll)
        comm.Recv(setup, source=0, tag=TAG_SETUP)
        capacity, max_seqs = (int(v) for v in setup)
        backend = self._stage_backend(plan, capacity, max_seqs)
        comm.Send(np.ones(1, dtype=np.int64), dest=0, tag=TAG_READY)

        records: list[Record] = []
        link = LinkEmulator(plan.scenario, plan.node_names) if ex.link_emulation else None
        messenger = Messenger(self.data_comm, self.clock, plan.node_names, records, link, poll)
        worker = Worker(self.rank, plan.n_ranks, backend, messenger, self.clock, records,
                        plan.node_names[self.rank], deadline, fault=ex.fault_rank == self.rank)
        worker.run()
        dropped = messenger.drain(deadline)
        report = {"records": [tuple(r) for r in records], "kv_max_cells": getattr(backend, "max_cells", 0),
                  "kv_final_cells": backend.kv_cells(), "dropped": dropped}
        request = comm.isend(report, dest=0, tag=TAG_RECORDS)
        while not request.Test():
            if time.monotonic() > deadline:
                raise ExecutorTimeout("timed out sending the trace records to the head")
            time.sleep(poll)
        return None
