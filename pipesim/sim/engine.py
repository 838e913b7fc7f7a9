"""The SimPy engine: drives the shared scheduling core with simulated time and modelled costs.

The engine is a clock, a transport and a cost model; every decision is the scheduling package's. Each pipeline
(the target's, or one per model of a PipeSpec chain) has a head process, which drives a ``HeadDriver`` (the
strategy, the launch queue, the head's priority order) and spends the time its work costs, and one SimPy process
per further stage (DistServe style), which drives a ``StageMachine``. Messages occupy one direction of a link
(FIFO, latency + bytes/bandwidth); cancellations travel from the head to the last stage and back towards stage 1;
messages between the levels of a chain travel between their heads.

As in the executor, a stage notices a cancellation when it next looks: an idle stage at its next poll, one
dispatching a run before it starts the forward, one computing at its next layer boundary; only then does it pass
the cancellation on, and it aborts a run in progress at the layer boundary where it notices. With a calibrated
profile's polling, idle ranks notice messages at their probe times; when the scenario runs the executor's link
emulation, a rank finds a message as soon as MPI delivers it and sleeps until its emulated arrival
(``PollBackoff``).

Stages and heads are driven by event callbacks rather than SimPy processes, and scheduled events are bare
(``_Call``, ``_Message``: what SimPy's loop reads of an event, cheaper than a ``Timeout``), but the engine
schedules exactly the events the process-per-stage model did, at the same instants and priorities and in the same
order, so results are the same bit for bit. One exception makes it faster: the wake-up of a waiting stage or head
(SimPy's ``Event.succeed``, an event at this instant) and an interrupt (an urgent event at this instant) are
handled at once when nothing else is due at this instant, since SimPy would process them next with nothing in
between (every caller wakes or interrupts as its last act). Two more merge events where nothing can tell them apart: a
stage's relayed KV transactions and the forward after them (``_stage_kv_compute``: the transactions' end is replayed,
by time and SimPy event id, where a cancellation arriving in between can see it), and the back-to-back steps of a
draft task on a head that looks at nothing else meanwhile (``_head_draft_rest``); each is scheduled at the time the
separate events would give, and records the same. Costs are memoised per stage (cost models are pure
functions of the node, the layers, the run's tokens, its context and its outputs). Python's cyclic garbage
collector is paused while a simulation runs: it would walk the growing list of records again and again, and the
events (freed as soon as they are processed) make no lasting cycles.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from heapq import heappush

import simpy
from simpy.events import NORMAL, URGENT

from ..metrics import MetricsTally
from ..scenario import Scenario
from ..scheduling import RequestDraft, Run, Strategy, make_strategies
from ..scheduling.driver import DRAFT, STAGE0, VERIFY, HeadDriver
from ..scheduling.prefix import common_prefix_len
from ..scheduling.records import COMPUTE, DISPATCH, TRANSFER, Record
from ..scheduling.stage import (
    ACTIVATIONS,
    HEADER,
    PREDICTIONS,
    SKIPPED_ACTIVATIONS,
    SKIPPED_PREDICTIONS,
    StageMachine,
)
from ..trace import Trace
from ..world.acceptance import level_predictor
from ..world.build import Pipeline, World, build_world
from ..world.costs import RooflineCostModel
from ..world.network import LinkDirection
from ..world.profile import kv_transaction_time
from .host_cpu import SharedHosts, SoloRun
from .polling import PollBackoff
from .remote_draft import RemoteDraft


class SimulationError(RuntimeError):
    """The simulation could not finish (e.g. it exceeded its event budget)."""


class _Call:
    """A bare SimPy event calling ``callbacks`` at its time (SimPy's loop reads only these and ``_ok``); ``eid``:
    its place among the events of one instant (SimPy's event id)."""

    __slots__ = ("callbacks", "eid")
    _ok = True


class _Message:
    """A message's arrival: a bare SimPy event whose ``value`` is when MPI delivered it (None: at arrival); a run's
    frame to a stage also carries the run and whether it was computed upstream."""

    __slots__ = ("callbacks", "computed", "eid", "run", "value")
    _ok = True


_COST_MEMO_SIZE = 1024  # a stage's memoised costs are forgotten beyond this many (memory stays bounded)
# one relayed KV transaction on the wire (ggml-mpi.c: a transaction tag, then its few int32 arguments, e.g.
# seq_cp's seq_src, seq_dst, p0, p1): what it adds to a hop's latency in a pipelined relay
KV_TRANSACTION_BYTES = 24
_TALLY_BATCH = 8192  # without records: records counted (and dropped) whenever this many are waiting


@dataclass
class _Stage:
    """Simulated state of one stage of a pipeline (stage 0 is its head's own layers: no machine)."""

    index: int
    node: int
    layers: tuple[int, int]
    machine: StageMachine | None
    wakeup: int = 0  # while waiting for a run: the wait's number (0: not waiting, or already woken)
    waits: int = 0
    idle_since: float = 0.0
    unseen_cancels: list[int] = field(default_factory=list)  # arrived while busy; noticed at the next look
    phase: str = "idle"  # idle, kv (relayed KV transactions), dispatch, compute, finishing (after an interrupt),
    # kvc (KV transactions, then the forward as one event: until ``kv_end`` the stage is in its KV transactions)
    current: int | None = None
    to_next: LinkDirection | None = None  # the link to the next stage, once used
    n_layers: int = 0
    costs: dict = field(default_factory=dict)  # memo: (n_tokens, context, n_outputs) -> StageCost
    # the run in progress: (run, computed upstream, cost), its start, work (s), work done, the layer boundary
    # it finishes after an interrupt, and the compute job
    task: tuple = ()
    start: float = 0.0
    work: float = 0.0
    done: float = 0.0
    boundary: float = 0.0
    job: object = None
    solo: bool = True  # on a host of its own (its compute is one plain event)
    kv_start: float = 0.0  # kvc: the KV transactions' span, and the event id their end event would have had
    kv_end: float = 0.0
    kv_eid: int = 0
    # callbacks, bound once (``_Line`` sets them)
    resume: Callable = None
    computed: Callable = None
    interrupted: Callable = None
    at_boundary: Callable = None
    dispatched: Callable = None
    kv_done: Callable = None
    kv_computed: Callable = None
    arrival: Callable = None

    def __post_init__(self) -> None:
        self.n_layers = self.layers[1] - self.layers[0]


@dataclass
class _DraftTask:
    request: RequestDraft
    tokens: list[int]
    first_batch: int
    context_start: int
    n_steps: int  # draft forwards: one per token, and one more for a token dropped below the confidence cut-off
    step: int = 0

    @property
    def done(self) -> bool:
        return self.step >= self.n_steps


class _Line:
    """One pipeline in the simulation: its stages, its head's driver, and the port the driver talks through."""

    def __init__(self, engine: SimulationEngine, pipeline: Pipeline, strategy: Strategy) -> None:
        self.engine = engine
        self.pipeline = pipeline
        self.level = pipeline.level
        self.head_node = pipeline.nodes[0]
        names = engine.node_names
        n = pipeline.n_stages
        full = strategy.cancelled_traffic == "full"
        self.stages = [_Stage(k, node, span, StageMachine(k, n, names[node], engine.records, pipeline.level, full)
                              if k else None)
                       for k, (node, span) in enumerate(zip(pipeline.nodes, pipeline.layer_ranges, strict=True))]
        # stages whose costs are the same function share their memo: with the plain roofline, stages of equal
        # node figures (the name aside) and layer counts
        memos: dict = {}
        for stage in self.stages:
            node = engine.world.nodes[stage.node]
            key = ((node.flops, node.memory_bandwidth, node.overhead_per_run, stage.n_layers)
                   if type(pipeline.cost) is RooflineCostModel else stage.index)
            stage.costs = memos.setdefault(key, {})
        self.driver = HeadDriver(strategy, self, names[self.head_node], n, engine.records, pipeline.level)
        self.wakeup = 0  # while the head waits for an event: the wait's number (0: not waiting, or woken)
        self.waits = 0
        self.idle_since = 0.0
        self.work_start = 0.0  # when the head began its current work
        self.resume = partial(engine._head_loop, self)
        for stage in self.stages[1:]:
            stage.resume = partial(engine._stage_woken, self, stage)
            stage.computed = partial(engine._stage_computed, self, stage)
            stage.interrupted = partial(engine._stage_interrupted, self, stage)
            stage.at_boundary = partial(engine._stage_at_boundary, self, stage)
            stage.dispatched = partial(engine._stage_dispatched, self, stage)
            stage.kv_done = partial(engine._stage_kv_done, self, stage)
            stage.kv_computed = partial(engine._stage_kv_computed, self, stage)
            stage.arrival = partial(engine._stage_arrival, self, stage)
            stage.solo = engine.hosts.group_of(stage.node) is None
        # what the draft model holds in its cache: ``draft_committed`` tokens of the committed sequence (which
        # never changes, so they need no comparing), then ``draft_tail``
        self.draft_committed = 0
        self.draft_tail: tuple[int, ...] = ()
        self.frame_bytes: dict[tuple, tuple[float, float]] = {}  # a frame's counts -> (header, with activations)
        self.kv_bursts: dict[int, tuple[float, float]] = {}  # run id -> (begin, end) of its KV burst where it last was
        self.draft_costs: dict[tuple[int, int], float] = {}  # memo: (tokens, context) -> the draft's step time
        self.remote_draft = engine.remote_draft(pipeline)  # the draft on a node of its own, else None
        # a draft task's steps as one event (``_head_draft_rest``)
        self.whole_drafts = (self.driver.whole_runs and self.remote_draft is None and len(engine.world.pipelines) == 1
                             and engine.hosts.group_of(self.head_node) is None)
        self.in_draft = False  # between begin_draft and end_draft (the remote draft's next step may start earlier)
        tokens = engine.world.tokens
        self.level_oracle = not pipeline.is_target  # predictions from the run (its prefix), not its positions
        if pipeline.is_target:
            self.predict = tokens.predictions
        else:  # a draft model of a chain
            self.predict = level_predictor(tokens, engine.acceptance, pipeline.accuracy,
                                           max(p.accuracy for p in engine.world.pipelines[:-1]))

    # -- the driver's port -----------------------------------------------------------------------------
    def now(self) -> float:
        return self.engine.env._now

    def drop(self, run: Run, send_header: bool) -> None:
        if send_header:
            self.engine.forward(self, self.stages[0], run, HEADER)

    def send_cancel(self, run_ids: tuple[int, ...]) -> None:
        engine, last = self.engine, self.stages[-1]
        engine.send(self.head_node, last.node, self.pipeline.payloads.cancel(len(run_ids)), "cancel", -1,
                    lambda e: engine.cancel_at(self, last, run_ids, e.value, e.eid), self.level)

    def send_to_level(self, message) -> None:
        engine = self.engine
        target = engine.lines[message.to_level]
        n_tokens = len(getattr(message, "tokens", getattr(message, "sequence", ())))

        def deliver(event) -> None:
            target.driver.message_arrived(message)
            engine.wake_head(target, event.value)

        engine.send(self.head_node, target.head_node, self.pipeline.payloads.level_message(n_tokens),
                    type(message).__name__, -1, deliver, self.level)

    def begin_draft(self, request: RequestDraft) -> _DraftTask:
        context = request.context
        known, tail = self.draft_committed, self.draft_tail  # the cache's first ``known`` tokens are the context's
        common = known + common_prefix_len(tail, context[known:known + len(tail)])
        cached = min(common, len(context) - 1)
        proposal = self.engine.draft.propose_request(request)  # a linear draft or a token tree
        self.in_draft = True
        return _DraftTask(request, proposal.tokens, first_batch=len(context) - cached, context_start=cached,
                          n_steps=proposal.n_steps)

    def end_draft(self, task: _DraftTask) -> None:
        """The draft model holds in its cache what the task's steps processed: ``context[:context_start]`` if it
        took no step, else the context and the drafted tokens it fed back."""
        request = task.request
        context, committed = request.context, request.committed_len
        self.in_draft = False
        if self.remote_draft is not None and 0 < task.step < len(task.tokens):  # abandoned: the draft node goes on
            base = task.context_start + task.first_batch - 1
            self.remote_draft.abandon([(1, base + j) for j in range(task.step, len(task.tokens))])
        if task.step == 0:
            known = min(committed, task.context_start)
            self.draft_committed, self.draft_tail = known, context[known:task.context_start]
        else:
            self.draft_committed, self.draft_tail = committed, context[committed:] + tuple(task.tokens[:task.step - 1])

    def finish(self) -> None:
        if not self.engine.finished.triggered:
            self.engine.finished.succeed()


class SimulationEngine:
    """Simulate one scenario; ``run()`` returns the trace.

    ``records=False``: metrics only. The trace keeps no records; they are counted as they come (``MetricsTally``)
    and dropped, so memory does not grow with them, and ``compute_metrics`` gives what it gives with records
    (the wasted share up to its last digit: see ``MetricsTally``).
    """

    def __init__(self, scenario: Scenario, max_events: int = 50_000_000, world: World | None = None,
                 records: bool = True) -> None:
        self.scenario = scenario
        self.max_events = max_events
        self.keep_records = records
        self.tally_batch = _TALLY_BATCH
        self.world = world if world is not None else build_world(scenario)
        self.node_names = self.world.node_names
        profile = self.world.profile
        self.polling = PollBackoff(**profile.poll) if profile is not None and profile.poll else None
        # with polling modelled: the executor's link emulation holds a message MPI delivered until its arrival
        self.held_messages = self.polling is not None and scenario.executor.link_emulation

    # -- public ------------------------------------------------------------------------------------
    def run(self, strategies: list[Strategy] | Strategy | None = None) -> Trace:
        """Simulate until the (target's) strategy finishes; returns the trace (simulated seconds from 0)."""
        world, scenario = self.world, self.scenario
        prompt = world.prompt()
        if strategies is None:
            strategies = make_strategies(scenario.strategy.name, prompt, scenario.workload.generate_tokens,
                                         scenario.strategy.params(), n_levels=len(world.pipelines),
                                         kv_capacity=world.kv_capacity(len(prompt)))
        elif isinstance(strategies, Strategy):
            strategies = [strategies]
        self.env = simpy.Environment()
        self._schedule = self.env.schedule
        self._queue = self.env._queue
        self._eid = self.env._eid  # SimPy's event ids: the order of events of one instant
        self.network = world.network()
        self.acceptance = world.acceptance()
        self.draft = world.oracle_draft(self.acceptance)
        self.hosts = SharedHosts(self.env, world.host_of, world.concurrent_slowdown)
        self.kv_time = [kv_transaction_time(world.profile, name, scenario.cluster.kv_transaction_time)
                        for name in self.node_names]  # per relayed KV transaction, by node
        self.kv_pipelined = scenario.cluster.kv_relay == "pipelined"
        self.records: list[tuple] = []  # plain tuples in Record's field order (fast); Records at the end
        self.tally = None if self.keep_records else MetricsTally(0.0, in_order=False)
        self._head_iterations = 0
        self.finished = self.env.event()
        self.lines = [_Line(self, pipeline, strategy)
                      for pipeline, strategy in zip(world.pipelines, strategies, strict=True)]
        collecting = gc.isenabled()
        gc.disable()
        try:
            for line in self.lines:
                line.driver.start()
            for line in self.lines:  # as the processes of a process-per-stage model would start: stages, head
                for stage in line.stages[1:]:
                    self._stage_loop(line, stage)
                self._head_loop(line)
            self._run_bounded()
            for line in self.lines:  # transactions that ended by now, of forwards still under way
                for stage in line.stages[1:]:
                    if stage.phase == "kvc" and stage.kv_end <= self.env._now:
                        self._kvc_begin(stage)
            if self.keep_records:
                records = list(map(partial(tuple.__new__, Record), self.records))
            else:
                self.tally.add(self.records)
                self.records.clear()
                records = []
        finally:
            if collecting:
                gc.enable()
        target = self.lines[-1].driver
        meta = {"layer_ranges": list(world.target.layer_ranges), "prompt_tokens": len(prompt),
                "cost_models": world.cost_sources(), "warnings": list(world.warnings)}
        if world.remote_draft:
            meta["draft_node"] = world.draft_node
        if len(self.lines) > 1:
            meta["chain"] = [[pipeline.spec.name for pipeline in world.pipelines]]
            meta["chain_nodes"] = [list(pipeline.nodes) for pipeline in world.pipelines]
        return Trace(engine="simulated", strategy=scenario.strategy.name, scenario=scenario.name,
                     nodes=self.node_names, t_start=0.0, t_end=self.env.now, records=records,
                     output_tokens=list(target.output), meta=meta, summary=self.tally)

    def _run_bounded(self) -> None:
        try:
            self.env.run(until=self.finished)
        except RuntimeError as error:
            if self.finished.triggered:
                raise
            raise SimulationError(f"simulation stalled before generation finished ({error})") from None

    def _tick(self) -> None:
        """Count head-loop iterations: a strategy that never finishes is stopped with an error."""
        self._head_iterations += 1
        if self._head_iterations > self.max_events:
            raise SimulationError(f"simulation exceeded {self.max_events} head steps without finishing")
        if self.tally is not None and len(self.records) >= self.tally_batch:
            self._count_records()

    def _count_records(self) -> None:
        """Without records: count the waiting ones and drop them. No record still to come starts before the
        oldest work in progress (a head's current work, a stage's forward or KV transactions, a pipelined KV burst
        still on its way down the pipeline, a remote draft's next step) or, for transfers, before now."""
        now = self.env._now
        watermark = now
        for line in self.lines:
            if not line.wakeup and line.work_start < watermark:
                watermark = line.work_start
            for stage in line.stages[1:]:
                if stage.phase in ("compute", "finishing", "kv") and stage.start < watermark:
                    watermark = stage.start
                elif stage.phase == "kvc" and stage.kv_start < watermark:
                    watermark = stage.kv_start
            for begin, _end in line.kv_bursts.values():  # a pipelined burst on its way: the next stage's begins later
                if begin < watermark:
                    watermark = begin
            remote = line.remote_draft  # its steps are recorded from when the draft node is free
            if remote is not None and (line.in_draft or remote.run_ahead) and remote.free_at < watermark:
                watermark = remote.free_at
        self.tally.add(self.records, watermark, now)
        self.records.clear()

    # -- events ------------------------------------------------------------------------------------
    def _at(self, delay: float, callback: Callable, priority=NORMAL) -> None:
        """``callback(event)`` after ``delay`` (a Timeout's place in SimPy's queue; ``URGENT``: an interrupt's)."""
        event = _Call()
        event.callbacks = [callback]
        event.eid = eid = next(self._eid)
        heappush(self._queue, (self.env._now + delay, priority, eid, event))  # what ``env.schedule`` does

    def _quiet(self) -> bool:
        """Nothing else is due at this instant (an event scheduled now would be the next one processed).
        Hot paths read SimPy's ``_now`` and ``_queue``: what its ``now`` and ``peek()`` return."""
        queue = self._queue
        return not queue or queue[0][0] > self.env._now

    def _resume(self, resume: Callable) -> None:
        """Wake a waiting stage or head (``Event.succeed``: an event at this instant); at once when nothing else is
        due at this instant (that event would be the next one processed)."""
        if self._quiet():
            resume(None)
        else:
            self._at(0.0, resume)

    def remote_draft(self, pipeline: Pipeline) -> RemoteDraft | None:
        """The draft's timeline when it runs on a node other than this (target) pipeline's head."""
        world = self.world
        if not pipeline.is_target or not world.remote_draft:
            return None
        head, node = pipeline.nodes[0], world.draft_node
        profile, cost = world.nodes[node], world.draft_cost
        return RemoteDraft(node, self.node_names[node], lambda batch, context: cost.model_cost(profile, batch, context),
                           self.network.link(head, node), self.network.link(node, head), self.records, pipeline.level)

    # -- messaging ---------------------------------------------------------------------------------
    def send(self, src: int, dst: int, nbytes: float, what: str, run_id: int, deliver, level: int = 0) -> None:
        self.send_on(self.network.link(src, dst), nbytes, what, run_id, deliver, level)

    def send_on(self, link, nbytes: float, what: str, run_id: int, deliver, level: int = 0) -> _Message:
        """A message on one direction of a link; ``deliver(event)`` runs at its arrival (the event, returned)."""
        now = self.env._now
        start, end, arrival = link.send(now, nbytes)
        self.records.append((TRANSFER, start, end, link.name, run_id, 0, nbytes, 0, 0, what, -1, level, False, False))
        # the event's value: when MPI has delivered the message, if the executor's link emulation then holds it
        # until ``arrival`` (a rank may find it earlier and sleep until then); None when it is there at arrival
        event = _Message()
        event.value = now + link.transport if self.held_messages else None
        event.callbacks = [deliver]
        event.eid = eid = next(self._eid)
        heappush(self._queue, (now + (arrival - now), NORMAL, eid, event))  # what ``env.schedule`` does
        return event

    def forward(self, line: _Line, stage: _Stage, run: Run, what: str | None) -> None:
        """Send a run on from ``stage``: activations, a header, or predictions to the pipeline's head."""
        if what is None:
            return
        if what == SKIPPED_PREDICTIONS:  # full logits of a cancelled run: they occupy the link, nobody reads them
            if stage.node != line.head_node:
                self.send(stage.node, line.head_node, line.pipeline.payloads.predictions(run.n_outputs), what,
                          run.run_id, _ignore, line.level)
            return
        if what == PREDICTIONS:
            if stage.node == line.head_node:  # a single-stage pipeline: the head holds everything
                self._deliver_predictions(line, run)
                return
            self.send(stage.node, line.head_node, line.pipeline.payloads.predictions(run.n_outputs), PREDICTIONS,
                      run.run_id, lambda e: self._deliver_predictions(line, run, e.value), line.level)
            return
        nxt = line.stages[stage.index + 1]
        computed = what == ACTIVATIONS
        full_frame = computed or what == SKIPPED_ACTIVATIONS
        counts = (len(run.tokens), len(run.kv_ops), len(run.seq_ids), "exit_layer" in run.meta)
        sizes = line.frame_bytes.get(counts)
        if sizes is None:  # the run's frame, by its counts: its header alone, and with activations
            payloads = line.pipeline.payloads
            sizes = line.frame_bytes[counts] = (payloads.header(*counts), payloads.activations(*counts))
        if stage.to_next is None:
            stage.to_next = self.network.link(stage.node, nxt.node)
        message = self.send_on(stage.to_next, sizes[full_frame], what, run.run_id, nxt.arrival, line.level)
        message.run, message.computed = run, computed

    def _stage_arrival(self, line: _Line, stage: _Stage, message: _Message) -> None:
        """A run's frame reaches ``stage`` (``message.run``, ``.computed``: whether it was computed upstream)."""
        stage.machine.arrive(message.run, message.computed)
        if stage.wakeup:
            if self.polling is None and self._quiet():  # ``_wake`` and ``_resume``, inlined
                stage.wakeup = 0
                if self._stage_take(line, stage):  # ``_stage_woken``
                    self._stage_loop(line, stage)
            else:
                self._wake(stage, message.value)

    def _deliver_predictions(self, line: _Line, run: Run, delivered: float | None = None) -> None:
        predictions = line.predict(run) if line.level_oracle else line.predict(run.positions[run.output_from:])
        line.driver.predictions_arrived(run.run_id, predictions, run.n_outputs)
        if line.wakeup:
            self._wake(line, delivered)

    def wake_head(self, line: _Line, delivered: float | None = None) -> None:
        if line.wakeup:
            self._wake(line, delivered)

    def _at_next_probe(self, idle_since: float, action: Callable[[int], None], delivered: float | None = None,
                       eid: int = 0) -> None:
        """Run ``action(eid)`` now (``eid``: the event being processed), or (a calibrated profile's polling) at the
        probe with which a rank idle since ``idle_since`` notices what has just arrived (``delivered``: when MPI
        delivered a message that the executor's link emulation held until now), with the probe event's id."""
        now = self.env._now
        if self.polling is None:
            noticed = now
        elif delivered is not None and delivered < now:
            noticed = self.polling.noticed_held(idle_since, delivered, now)
        else:
            noticed = self.polling.noticed(idle_since, now)
        if noticed <= now:
            action(eid)
        else:
            self._at(noticed - now, lambda event: action(event.eid))

    def _wake(self, waiter: _Stage | _Line, delivered: float | None = None) -> None:
        """Wake a waiting stage or head (``waiter.wakeup`` set) at the probe that notices the message."""
        if self.polling is None:  # noticed at once
            waiter.wakeup = 0
            self._resume(waiter.resume)
            return
        wait = waiter.wakeup

        def wake(_eid: int) -> None:
            if waiter.wakeup == wait:  # still the same wait, not yet woken
                waiter.wakeup = 0
                self._resume(waiter.resume)

        self._at_next_probe(waiter.idle_since, wake, delivered)

    def cancel_at(self, line: _Line, stage: _Stage, run_ids: tuple[int, ...], delivered: float | None = None,
                  eid: int = 0) -> None:
        """A cancellation reaches ``stage`` (by the event ``eid``): an idle stage notices it at its next poll, a
        busy one when it looks."""
        if stage.phase != "idle":
            self._cancel_unseen(stage, run_ids, eid)
            return

        def probe(probe_eid: int) -> None:
            if stage.phase == "idle":
                self._notice_cancels(line, stage, run_ids)
            else:  # a run woke the stage first: it looks again before the forward or at a layer boundary
                self._cancel_unseen(stage, run_ids, probe_eid)

        self._at_next_probe(stage.idle_since, probe, delivered, eid)

    def _cancel_unseen(self, stage: _Stage, run_ids: tuple[int, ...], eid: int) -> None:
        stage.unseen_cancels.extend(run_ids)
        if stage.phase == "kvc" and self._kv_ended(stage, eid):
            self._kvc_begin(stage)
        if stage.phase == "compute":  # stop at the next layer boundary to look (an interrupt: urgent, at once)
            stage.phase = "finishing"
            if self._quiet():
                stage.interrupted(None)
            else:
                self._at(0.0, stage.interrupted, URGENT)

    def _notice_unseen(self, line: _Line, stage: _Stage) -> None:
        if stage.unseen_cancels:
            run_ids, stage.unseen_cancels = tuple(stage.unseen_cancels), []
            self._notice_cancels(line, stage, run_ids)

    def _notice_cancels(self, line: _Line, stage: _Stage, run_ids: tuple[int, ...]) -> None:
        """The stage sees the cancellation; its machine says whether it passes it on towards stage 1."""
        if stage.machine.see_cancels(run_ids, self.env._now):
            previous = line.stages[stage.index - 1]
            self.send(stage.node, previous.node, line.pipeline.payloads.cancel(len(run_ids)), "cancel", -1,
                      lambda e: self.cancel_at(line, previous, run_ids, e.value, e.eid), line.level)

    def _schedule_early_exit(self, line: _Line, stage: _Stage, run: Run, cost) -> float:
        """SPEED: if the run's exit layer is on this stage, send the early prediction when that layer is done.

        Returns the extra time the stage spends on the exit head (final norm + output head on one token).
        """
        exit_layer = run.meta.get("exit_layer")
        if exit_layer is None or not stage.layers[0] <= exit_layer < stage.layers[1]:
            return 0.0
        node = self.world.nodes[stage.node]
        exit_head = line.pipeline.cost.output_head_time(node, 1)
        offset = node.overhead_per_run + (exit_layer - stage.layers[0] + 1) * cost.per_layer + exit_head
        position = run.last_position + 1
        tokens = self.world.tokens
        # against the prefix: a run whose token is wrong predicts a wrong one (its chain was right up to it)
        right = run.tokens[-1] == tokens.token(run.last_position) and self.acceptance.correct(position, 0)
        token = tokens.token(position) if right else tokens.wrong(position)

        def emit(_event) -> None:
            if stage.current != run.run_id:
                return  # aborted before reaching the exit layer
            now = self.env._now
            self.records.append((COMPUTE, now - exit_head, now, node.name, run.run_id, 1, 0.0, 0, 0, "exit", exit_layer,
                                 line.level, False, False))
            if stage.node == line.head_node:
                line.driver.early_exit_arrived(run.run_id, token)
                self.wake_head(line)
            else:
                def arrive(event) -> None:
                    line.driver.early_exit_arrived(run.run_id, token)
                    self.wake_head(line, event.value)

                self.send(stage.node, line.head_node, line.pipeline.payloads.early_exit(), "early-exit", run.run_id,
                          arrive, line.level)

        self._at(offset, emit)
        return exit_head

    def _cost(self, line: _Line, stage: _Stage, node, run: Run, last: bool):
        """The stage's cost of ``run`` (memoised: cost models are pure functions of their arguments)."""
        key = (len(run.tokens), run.positions[0], run.n_outputs if last else 0)
        cost = stage.costs.get(key)
        if cost is None:
            if len(stage.costs) >= _COST_MEMO_SIZE:
                stage.costs.clear()
            cost = stage.costs[key] = line.pipeline.cost.stage_cost(node, stage.n_layers, *key)
        return cost

    # -- stages ------------------------------------------------------------------------------------
    # A stage's loop, as a process-per-stage model runs it (DistServe style), but driven by its events: look at
    # the cancellations that arrived unseen, take the next run (or wait for one), compute it (a calibrated
    # profile's dispatch first) or skip it, send it on, and again. Each method returns when the stage waits.
    def _stage_loop(self, line: _Line, stage: _Stage) -> None:
        """The top of the stage's loop."""
        while True:
            if stage.unseen_cancels:
                self._notice_unseen(line, stage)
            if not self._stage_take(line, stage):
                return

    def _stage_woken(self, line: _Line, stage: _Stage, _event=None) -> None:
        if self._stage_take(line, stage):
            self._stage_loop(line, stage)

    def _stage_take(self, line: _Line, stage: _Stage) -> bool:
        """Take the next run, or wait for one; True when the run was skipped (the loop goes on at once)."""
        machine = stage.machine
        if not machine.queue:
            stage.waits += 1
            stage.wakeup = stage.waits
            stage.idle_since = self.env._now
            stage.phase = "idle"
            return False
        now = self.env._now
        free = stage.idle_since if stage.phase == "idle" else now  # when it finished the work before this run
        stage.phase = "dispatch"
        run, computed_upstream, _ = machine.queue.popleft()
        if run.kv_transactions:  # the relayed KV transactions first (then as below, in ``_stage_kv_done``)
            begin, end = self._kv_burst(line, stage, run, free)
            kv = end - now
            if kv <= 0:  # the burst, relayed ahead of the run, was applied before the run arrived
                self.records.append((COMPUTE, begin, end, self.node_names[stage.node], run.run_id,
                                     run.kv_transactions, 0.0, 0, 0, "kv", -1, 0, False, False))
                return self._stage_decide(line, stage, run, computed_upstream)
            if stage.solo and not run.meta and machine.computes(run, computed_upstream):
                cost = stage.costs.get((len(run.tokens), run.positions[0], run.n_outputs if machine.is_last else 0))
                if cost is None:
                    cost = self._cost(line, stage, self.world.nodes[stage.node], run, machine.is_last)
                if cost.dispatch <= 0:
                    self._stage_kv_compute(stage, run, cost, kv, begin)
                    return False
            stage.phase = "kv"
            stage.start = begin
            stage.task = (run, computed_upstream, None)
            self._kv_transactions(stage.node, run, stage.kv_done, kv, begin)
            return False
        return self._stage_decide(line, stage, run, computed_upstream)

    def _kv_burst(self, line: _Line, stage: _Stage, run: Run, free: float) -> tuple[float, float]:
        """When ``stage`` begins and ends the relayed KV transactions ahead of ``run`` (its previous work ended at
        ``free``).

        Pipelined (``cluster.kv_relay``, the default; ``ggml-mpi.c``: a rank receives a transaction, sends it on,
        then applies it): the burst's first transaction reaches this stage one hop after the previous stage began
        it, and each one ends here no sooner than one hop and one transaction after it ended there, so the stage
        ends the burst at ``max(begin + n t, previous end + hop + t)`` with ``hop`` the link's latency and a
        transaction's bytes (``KV_TRANSACTION_BYTES``). The transactions' bytes are not queued on the link. Serial,
        or on a shared host: the whole burst from now, when the run is taken (on this machine's two ranks sharing a
        host the pipelined form over-predicted PipeInfer by 23-26%, the serial one missed by -15% and +7%).
        """
        now = self.env._now
        n, each = run.kv_transactions, self.kv_time[stage.node]
        previous = line.kv_bursts.pop(run.run_id, None) if self.kv_pipelined else None
        if previous is None or not stage.solo:
            begin, end = now, now + n * each
        else:
            link = self.network.link(line.stages[stage.index - 1].node, stage.node)
            hop = link.latency + KV_TRANSACTION_BYTES / link.bandwidth
            begin = max(previous[0] + hop, free)
            end = max(begin + n * each, previous[1] + hop + each)
        if self.kv_pipelined and not stage.machine.is_last:
            line.kv_bursts[run.run_id] = (begin, end)
        return begin, end

    def _stage_kv_compute(self, stage: _Stage, run: Run, cost, kv: float, begin: float) -> None:
        """A run the stage will compute after its KV transactions, with no dispatch: the transactions and the
        forward as one event (phase ``kvc``). Nothing the stage does at the transactions' end depends on what
        happens during them (a cancellation arriving then is only noticed after the forward, new runs queue), so
        the forward's end is known at once: it is scheduled at the time the two events would give (the
        transactions' end, plus the forward), and the transactions' end is replayed where it can be seen (a
        cancellation arriving after it interrupts the forward: ``_kv_ended``)."""
        now = self.env._now
        stage.kv_start, stage.start = begin, now  # (a pipelined burst may have begun before the run arrived)
        stage.kv_end = kv_end = now + kv  # the transactions' end event's time
        stage.kv_eid = next(self._eid)  # ... and its id
        stage.current = stage.machine.current = run.run_id
        stage.task = (run, None, cost)
        stage.work = work = cost.total - cost.dispatch
        stage.done = 0.0
        stage.phase = "kvc"
        job = SoloRun()
        job.callbacks = [stage.kv_computed]
        job.env = self.env
        job.since = kv_end
        job.work = work
        stage.job = job
        heappush(self._queue, (kv_end + work, NORMAL, next(self._eid), job))

    def _kv_ended(self, stage: _Stage, eid: int) -> bool:
        """In phase kvc, at the event ``eid`` of now: whether the transactions' end event came first."""
        now = self.env._now
        return now > stage.kv_end or (now == stage.kv_end and eid > stage.kv_eid)

    def _kvc_begin(self, stage: _Stage) -> None:
        """The transactions of a kvc stage have ended: their record, and the forward from their end."""
        run = stage.task[0]
        self.records.append((COMPUTE, stage.kv_start, stage.kv_end, self.node_names[stage.node], run.run_id,
                             run.kv_transactions, 0.0, 0, 0, "kv", -1, 0, False, False))
        stage.start = stage.kv_end
        stage.phase = "compute"

    def _stage_kv_computed(self, line: _Line, stage: _Stage, _job=None) -> None:
        if stage.phase == "kvc":
            self._kvc_begin(stage)
        self._stage_computed(line, stage)

    def _stage_kv_done(self, line: _Line, stage: _Stage) -> None:
        stage.phase = "dispatch"
        run, computed_upstream, _ = stage.task
        if self._stage_decide(line, stage, run, computed_upstream):
            self._stage_loop(line, stage)

    def _stage_decide(self, line: _Line, stage: _Stage, run: Run, computed_upstream: bool) -> bool:
        """Compute the taken run (its dispatch first) or skip it; True when it was skipped (sent on)."""
        machine = stage.machine
        compute = machine.computes(run, computed_upstream)
        cost = None
        if compute:
            cost = stage.costs.get((len(run.tokens), run.positions[0], run.n_outputs if machine.is_last else 0))
            if cost is None:
                cost = self._cost(line, stage, self.world.nodes[stage.node], run, machine.is_last)
            stage.current = machine.current = run.run_id
            if cost.dispatch > 0:
                stage.task = (run, computed_upstream, cost)
                self._dispatch(stage.node, cost, run, stage.dispatched)
                return False
        return self._stage_start(line, stage, run, cost, compute)

    def _stage_dispatched(self, line: _Line, stage: _Stage) -> None:
        """After the dispatch: the executor looks once more before the forward."""
        run, computed_upstream, cost = stage.task
        self._notice_unseen(line, stage)
        if self._stage_start(line, stage, run, cost, stage.machine.computes(run, computed_upstream)):
            self._stage_loop(line, stage)

    def _stage_start(self, line: _Line, stage: _Stage, run: Run, cost, compute: bool) -> bool:
        """Start the forward of ``run``, or skip it (True: skipped, sent on)."""
        if not compute:
            stage.current = stage.machine.current = None
            self.forward(line, stage, run, stage.machine.skipped(run, self.env._now))
            return True
        stage.task = (run, None, cost)
        stage.start = self.env._now
        work = cost.total - cost.dispatch
        if run.meta:
            work += self._schedule_early_exit(line, stage, run, cost)
        stage.work, stage.done = work, 0.0
        stage.phase = "compute"
        stage.job = self.hosts.start(stage.node, work, stage.computed)
        return False

    def _stage_computed(self, line: _Line, stage: _Stage, _job=None) -> None:
        stage.job = None
        run = stage.task[0]
        stage.current = None
        self.forward(line, stage, run, stage.machine.finished(run, stage.start, self.env._now, False))
        self._stage_loop(line, stage)

    def _stage_end(self, line: _Line, stage: _Stage, aborted: bool) -> None:
        run = stage.task[0]
        stage.current = None
        self.forward(line, stage, run, stage.machine.finished(run, stage.start, self.env._now, aborted))
        self._stage_loop(line, stage)

    def _stage_interrupted(self, line: _Line, stage: _Stage, _event=None) -> None:
        """A cancellation arrived during the forward: the stage finishes the layer in progress, looks at what
        arrived (passing it on), and stops there if its own run is cancelled, else goes on. As in the executor,
        the last look is after the last layer: a cancellation arriving during the output head is seen only once
        the run is complete (and its predictions are sent anyway)."""
        stage.done += stage.job.interrupt()
        stage.job = None
        cost, work, done = stage.task[2], stage.work, stage.done
        boundary = work
        layers_end = stage.n_layers * cost.per_layer
        if cost.per_layer > 0 and done < layers_end - 1e-12:  # the next layer boundary
            boundary = min(math.ceil(done / cost.per_layer - 1e-9) * cost.per_layer, layers_end)
        if boundary > done:
            stage.boundary = boundary
            self.hosts.start(stage.node, boundary - done, stage.at_boundary)
            return
        self._stage_looks(line, stage)

    def _stage_at_boundary(self, line: _Line, stage: _Stage, _job=None) -> None:
        stage.done = stage.boundary
        self._stage_looks(line, stage)

    def _stage_looks(self, line: _Line, stage: _Stage) -> None:
        """At the layer boundary after an interrupt: done, aborted, or on with the rest of the forward."""
        self._notice_unseen(line, stage)
        if stage.done >= stage.work - 1e-12:
            self._stage_end(line, stage, False)
        elif stage.machine.must_abort():
            self._stage_end(line, stage, True)
        else:
            stage.phase = "compute"
            stage.job = self.hosts.start(stage.node, stage.work - stage.done, stage.computed)

    def _kv_transactions(self, node: int, run: Run, then: Callable[[], None], seconds: float | None = None,
                         begin: float | None = None) -> None:
        """The relayed KV transactions ahead of ``run`` (PipeInfer's reference): one event for all of them, of
        ``seconds`` (the whole burst's time by default), recorded from ``begin`` (now by default)."""
        start = self.env._now if begin is None else begin

        def applied(_job) -> None:
            self.records.append((COMPUTE, start, self.env._now, self.node_names[node], run.run_id,
                                 run.kv_transactions, 0.0, 0, 0, "kv", -1, 0, False, False))  # busy, not target compute
            then()

        self.hosts.start(node, run.kv_transactions * self.kv_time[node] if seconds is None else seconds, applied)

    def _dispatch(self, node: int, cost, run: Run, then: Callable[[], None]) -> None:
        """A calibrated profile's per-run messaging and scheduling before the forward: busy, not computing."""
        start = self.env._now

        def dispatched(_job) -> None:
            self.records.append((DISPATCH, start, self.env._now, self.node_names[node], run.run_id, run.n_tokens,
                                 0.0, 0, 0, "", -1, 0, False, False))
            then()

        self.hosts.start(node, cost.dispatch, dispatched)

    # -- heads -------------------------------------------------------------------------------------
    def _head_loop(self, line: _Line, _event=None) -> None:
        """A pipeline head's loop: take the driver's next work and spend its time (returns when it waits)."""
        env = self.env
        driver = line.driver
        finished = self.finished
        while not finished.triggered:
            self._tick()
            work = driver.next_work()
            if work is None:
                line.waits += 1
                line.wakeup = line.waits
                line.idle_since = env._now
                return
            kind, item = work
            start = line.work_start = env._now
            if kind is VERIFY:
                if self.world.verify_overhead > 0:
                    self.hosts.start(line.head_node, self.world.verify_overhead,
                                     partial(self._head_verified, line, item, start))
                    return
                driver.verify(item, start)
            elif kind is STAGE0:
                run = item
                head = self.world.nodes[line.head_node]
                cost = self._cost(line, line.stages[0], head, run, len(line.stages) == 1)
                line.stages[0].current = run.run_id
                if run.kv_transactions:
                    if self.kv_pipelined and len(line.stages) > 1:  # the head issues the burst: it begins now
                        line.kv_bursts[run.run_id] = (start, start + run.kv_transactions * self.kv_time[line.head_node])
                    self._kv_transactions(line.head_node, run, partial(self._head_dispatch, line, run, cost))
                else:
                    self._head_dispatch(line, run, cost)
                return
            else:
                assert kind is DRAFT
                task = item
                batch = task.first_batch if task.step == 0 else 1
                context = task.context_start if task.step == 0 else task.context_start + task.first_batch + task.step - 1
                remote = line.remote_draft
                if remote is not None:  # the draft on its own node: the head waits for the step's reply
                    reply = remote.step(start, task.step == 0, batch, batch, context)
                    self._at(reply - start, partial(self._head_drafted, line, task, start, batch, remote=True))
                    return
                cost = self._draft_cost(line, batch, context)
                if line.whole_drafts and task.step + 1 < task.n_steps:
                    self._head_draft_rest(line, task, start, batch, cost)
                    return
                self.hosts.start(line.head_node, cost, partial(self._head_drafted, line, task, start, batch))
                return

    def _draft_cost(self, line: _Line, batch: int, context: int) -> float:
        """The head's draft step of ``batch`` tokens after ``context`` (memoised)."""
        cost = line.draft_costs.get((batch, context))
        if cost is None:
            if len(line.draft_costs) >= _COST_MEMO_SIZE:
                line.draft_costs.clear()
            cost = line.draft_costs[batch, context] = self.world.draft_cost.model_cost(
                self.world.nodes[line.head_node], batch, context)
        return cost

    def _head_draft_rest(self, line: _Line, task: _DraftTask, start: float, batch: int, cost: float) -> None:
        """A head that runs a draft task's steps back to back (``head_priority: run``, a head of its own, one
        pipeline): nothing can come between them (the driver looks at nothing else until the task is done), so
        its remaining steps are one event, at the time their events would give (each step's end plus the next
        step's cost); each step is recorded as it was."""
        steps = []
        end = start + cost
        steps.append((start, batch, end))
        base = task.context_start + task.first_batch - 1
        for step in range(task.step + 1, task.n_steps):
            begin = end
            end = begin + self._draft_cost(line, 1, base + step)
            steps.append((begin, 1, end))
        job = SoloRun()
        job.callbacks = [partial(self._head_drafted_all, line, task, steps)]
        job.env = self.env
        job.since = start
        job.work = end - start
        heappush(self._queue, (end, NORMAL, next(self._eid), job))

    def _head_drafted_all(self, line: _Line, task: _DraftTask, steps: list, _job=None) -> None:
        driver = line.driver
        for start, batch, end in steps[:-1]:
            task.step += 1
            driver.draft_step_done(task, start, batch, end=end)
        start, batch, _ = steps[-1]
        task.step += 1
        driver.draft_step_done(task, start, batch)
        self._head_loop(line)

    def _head_verified(self, line: _Line, item: tuple, start: float, _job=None) -> None:
        line.driver.verify(item, start)
        self._head_loop(line)

    def _head_dispatch(self, line: _Line, run: Run, cost) -> None:
        """The head's dispatch of ``run`` (a calibrated profile's), then its own layers."""
        if cost.dispatch > 0:
            self._dispatch(line.head_node, cost, run, partial(self._head_stage0, line, run, cost))
        else:
            self._head_stage0(line, run, cost)

    def _head_stage0(self, line: _Line, run: Run, cost) -> None:
        """The head's own layers of ``run`` (after its dispatch)."""
        work = cost.total - cost.dispatch
        if run.meta:
            work += self._schedule_early_exit(line, line.stages[0], run, cost)
        self.hosts.start(line.head_node, work, partial(self._head_stage0_done, line, run, self.env._now))

    def _head_stage0_done(self, line: _Line, run: Run, start: float, _job=None) -> None:
        line.stages[0].current = None
        line.driver.stage0_done(run, start)
        self.forward(line, line.stages[0], run, PREDICTIONS if len(line.stages) == 1 else ACTIVATIONS)
        self._head_loop(line)

    def _head_drafted(self, line: _Line, task: _DraftTask, start: float, batch: int, _job=None,
                      remote: bool = False) -> None:
        task.step += 1
        line.driver.draft_step_done(task, start, batch, remote)
        self._head_loop(line)


def _ignore(_event) -> None:
    """Arrival of a message nobody reads."""


def simulate(scenario: Scenario, records: bool = True) -> Trace:
    """Simulate a scenario with its configured strategy (``records=False``: metrics only, no records kept)."""
    return SimulationEngine(scenario, records=records).run()
