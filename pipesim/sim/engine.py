"""The SimPy engine: drives the shared scheduling core with simulated time and modelled costs.

One SimPy process per pipeline stage (DistServe style) plus the head, which holds stage 0, the draft model and
the strategy. The head works in PipeInfer's order of priority: returned predictions first, then launching runs
(its own layers), then drafting one token at a time, so a draft never delays a verification by more than one
draft step. Messages occupy one direction of a link (FIFO, latency + bytes/bandwidth); cancellations travel from
the head to the last stage and backwards, stage by stage. As in the executor, a stage notices a cancellation
when it next looks: an idle stage at its next poll, one dispatching a run before it starts the forward, one
computing at its next layer boundary; only then does it pass the cancellation on. It skips a cancelled run it has
not started and aborts one in progress at the layer boundary where it notices. With a calibrated profile's
polling, idle ranks notice messages at their probe times; when the scenario runs the executor's link emulation,
a rank finds a message as soon as MPI delivers it and sleeps until its emulated arrival (``PollBackoff``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import simpy

from ..placement import split_layers
from ..scenario import Scenario
from ..scheduling import (
    CancelRuns,
    EmitTokens,
    Finish,
    InvalidateRuns,
    LaunchRun,
    RequestDraft,
    Run,
    Strategy,
    make_strategy,
)
from ..scheduling.prefix import common_prefix_len
from ..trace import Record, Trace
from ..world.acceptance import AcceptanceModel, OracleDraft, SyntheticTokens
from ..world.costs import CalibratedCostModel, NodeProfile, Payloads, make_cost_model
from ..world.network import Network
from .host_cpu import SharedHosts
from .polling import PollBackoff


class SimulationError(RuntimeError):
    """The simulation could not finish (e.g. it exceeded its event budget)."""


@dataclass
class _Stage:
    index: int
    node: int
    layers: tuple[int, int]
    queue: deque = field(default_factory=deque)
    wakeup: simpy.Event | None = None
    idle_since: float = 0.0
    cancelled: set[int] = field(default_factory=set)
    unseen_cancels: list[int] = field(default_factory=list)  # arrived while busy; noticed at the next look
    phase: str = "idle"  # idle, dispatch, compute, finishing (the layer in progress after an interrupt)
    current: int | None = None
    process: simpy.Process | None = None

    @property
    def n_layers(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass
class _DraftTask:
    request: RequestDraft
    tokens: list[int]
    first_batch: int
    context_start: int
    step: int = 0


class SimulationEngine:
    """Simulate one scenario with one strategy; ``run()`` returns the trace."""

    def __init__(self, scenario: Scenario, max_events: int = 50_000_000) -> None:
        self.scenario = scenario
        self.max_events = max_events
        target = scenario.models.target_spec()
        draft = scenario.models.draft_spec()
        cluster = scenario.cluster
        self.nodes = [NodeProfile(f"n{i}", cluster.flops, cluster.memory_bandwidth, cluster.overhead_per_run)
                      for i in range(cluster.count)]
        for override in cluster.overrides:
            base = self.nodes[override.index]
            self.nodes[override.index] = NodeProfile(
                base.name,
                override.flops if override.flops is not None else base.flops,
                override.memory_bandwidth if override.memory_bandwidth is not None else base.memory_bandwidth,
                override.overhead_per_run if override.overhead_per_run is not None else base.overhead_per_run)
        self.node_names = [node.name for node in self.nodes]
        self.layer_ranges = split_layers(target.n_layers, scenario.placement.layer_split, cluster.count)
        self.profile = None
        if cluster.profile is not None:
            from ..world.profile import HardwareProfile

            self.profile = HardwareProfile.load(cluster.profile)
            self.target_cost = CalibratedCostModel(target, self.profile, "target")
            self.draft_cost = CalibratedCostModel(draft, self.profile, "draft") if draft else None
        else:
            self.target_cost = make_cost_model(target, scenario)
            self.draft_cost = make_cost_model(draft, scenario, "draft") if draft else None
        self.payloads = Payloads(target.d_model, target.vocab_size, scenario.models.activation_bytes,
                                 scenario.head.return_mode, scenario.head.top_k)
        overrides = {frozenset(link.between): (link.bandwidth, link.latency) for link in scenario.network.links}
        transport = None
        if self.profile is not None and scenario.network.profile_links == "add":
            index = {name: i for i, name in enumerate(self.node_names)}
            transport = {}
            for key, link in self.profile.links.items():
                src, _, dst = key.partition("->")
                if src in index and dst in index:
                    transport[(index[src], index[dst])] = (link.latency, link.bandwidth)
        self.network = Network(self.node_names, scenario.network.bandwidth, scenario.network.latency, overrides,
                               transport)
        self.polling = PollBackoff(**self.profile.poll) if self.profile is not None and self.profile.poll else None
        # with polling modelled: the executor's link emulation holds a message MPI delivered until its arrival
        self.held_messages = self.polling is not None and scenario.executor.link_emulation
        workload = scenario.workload
        self.tokens = SyntheticTokens(target.vocab_size, workload.seed)
        acc = scenario.acceptance
        self.acceptance = AcceptanceModel(acc.model, scenario.acceptance_alpha(), acc.alphas, acc.sequence,
                                          prompt_len=workload.prompt_tokens, seed=acc.seed + 7919 * workload.seed)
        self.draft = OracleDraft(self.tokens, self.acceptance)

    # -- public ------------------------------------------------------------------------------------
    def run(self, strategy: Strategy | None = None) -> Trace:
        """Simulate until the strategy finishes; returns the trace (simulated seconds from 0)."""
        scenario = self.scenario
        prompt = [self.tokens.token(p) for p in range(scenario.workload.prompt_tokens)]
        if strategy is None:
            strategy = make_strategy(scenario.strategy.name, prompt, scenario.workload.generate_tokens,
                                     scenario.strategy.params())
        self.strategy = strategy
        self.env = simpy.Environment()
        self.hosts = self._shared_hosts()
        self.head_idle_since = 0.0
        self.records: list[tuple] = []  # plain tuples in Record's field order (fast); Records at the end
        self._head_iterations = 0
        self.finished = self.env.event()
        self.head_inbox: deque[tuple[Run, int | None]] = deque()  # (run, None) predictions, (run, token) early exit
        self.head_wakeup: simpy.Event | None = None
        self.launch_queue: deque[Run] = deque()
        self.head_cancelled: set[int] = set()
        self.draft_task: _DraftTask | None = None
        self.draft_cache: tuple[int, ...] = ()
        self.output_tokens: list[int] = []
        self.stages = [_Stage(i, i, r) for i, r in enumerate(self.layer_ranges)]
        for stage in self.stages[1:]:
            stage.process = self.env.process(self._stage_loop(stage))
        self.env.process(self._head_loop())
        self._execute(strategy.start())
        self._run_bounded()
        records = list(map(Record._make, self.records))
        return Trace(engine="simulated", strategy=strategy.name, scenario=scenario.name, nodes=self.node_names,
                     t_start=0.0, t_end=self.env.now, records=records, output_tokens=self.output_tokens,
                     meta={"layer_ranges": self.layer_ranges, "prompt_tokens": len(prompt)})

    def _shared_hosts(self) -> SharedHosts:
        """Nodes of the profile that share a host slow each other's compute (``concurrent_slowdown``)."""
        hosts: list[str | None] = [None] * len(self.node_names)
        slowdown = [1.0] * len(self.node_names)
        if self.profile is not None:
            for i, name in enumerate(self.node_names):
                node = self.profile.nodes.get(name)
                if node is not None:
                    hosts[i], slowdown[i] = node.host or None, node.concurrent_slowdown
        return SharedHosts(self.env, hosts, slowdown)

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

    # -- actions -----------------------------------------------------------------------------------
    def _execute(self, actions) -> None:
        now = self.env.now
        records = self.records
        for action in actions:
            if isinstance(action, LaunchRun):
                run = action.run
                records.append(("launch", now, now, self.node_names[0], run.run_id, run.n_tokens, 0.0, 0, 0, run.kind))
                self.launch_queue.append(run)
            elif isinstance(action, RequestDraft):
                self._start_draft(action)
            elif isinstance(action, EmitTokens):
                self.output_tokens.extend(action.tokens)
                records.append(("tokens", now, now, self.node_names[0], -1, len(action.tokens), 0.0,
                                action.n_drafted_checked, action.n_drafted_accepted, ""))
            elif isinstance(action, InvalidateRuns):
                for run_id in action.run_ids:
                    records.append(("invalidate", now, now, self.node_names[0], run_id, 0, 0.0, 0, 0, ""))
            elif isinstance(action, CancelRuns):
                self._send_cancel(action.run_ids)
            elif isinstance(action, Finish):
                if not self.finished.triggered:
                    self.finished.succeed()

    def _start_draft(self, request: RequestDraft) -> None:
        assert self.draft_cost is not None, "a draft was requested but the scenario has no draft model"
        context = request.context
        cached = min(common_prefix_len(self.draft_cache, context), len(context) - 1)
        tokens = self.draft.propose(len(context), request.n_tokens, request.committed_len)
        self.draft_task = _DraftTask(request, tokens, first_batch=len(context) - cached, context_start=cached)

    def _draft_processed(self, task: _DraftTask) -> tuple[int, ...]:
        """Tokens the draft model holds in its cache after ``task.step`` steps of a draft task."""
        context = task.request.context
        if task.step == 0:
            return context[:task.context_start]
        return context + tuple(task.tokens[:task.step - 1])

    # -- messaging ---------------------------------------------------------------------------------
    def _send(self, src: int, dst: int, nbytes: float, note: str, run_id: int, deliver) -> None:
        link = self.network.link(src, dst)
        start, end, arrival = link.send(self.env.now, nbytes)
        self.records.append(("transfer", start, end, link.name, run_id, 0, nbytes, 0, 0, note))
        # the event's value: when MPI has delivered the message, if the executor's link emulation then holds it
        # until ``arrival`` (a rank may find it earlier and sleep until then); None when it is there at arrival
        delivered = self.env.now + link.transport if self.held_messages else None
        event = self.env.timeout(arrival - self.env.now, value=delivered)
        event.callbacks.append(deliver)

    def _forward(self, stage: _Stage, run: Run, computed: bool) -> None:
        """Send a run on from ``stage``: activations (or just the header if skipped) or predictions to the head."""
        last = stage.index == len(self.stages) - 1
        if last:
            if not computed:
                return
            if stage.node == 0:  # a single-stage pipeline: the head holds everything
                self._deliver_to_head(run)
                return
            nbytes = self.payloads.predictions(run.n_outputs)
            self._send(stage.node, 0, nbytes, "predictions", run.run_id,
                       lambda e, r=run: self._deliver_to_head(r, delivered=e.value))
            return
        if not computed and not run.kv_ops:
            return  # a cancelled run carrying no KV operations needs no header downstream
        nxt = self.stages[stage.index + 1]
        if computed:
            nbytes = self.payloads.activations(run.n_tokens, len(run.kv_ops))
            note = "activations"
        else:
            nbytes = self.payloads.header(run.n_tokens, len(run.kv_ops))
            note = "header"
        self._send(stage.node, nxt.node, nbytes, note, run.run_id,
                   lambda e, r=run, c=computed, s=nxt: self._deliver_to_stage(s, r, c, e.value))

    def _deliver_to_stage(self, stage: _Stage, run: Run, computed_upstream: bool,
                          delivered: float | None = None) -> None:
        stage.queue.append((run, computed_upstream))
        if stage.wakeup is not None and not stage.wakeup.triggered:
            self._wake(stage.wakeup, stage.idle_since, delivered)

    def _deliver_to_head(self, run: Run, early_token: int | None = None, delivered: float | None = None) -> None:
        self.head_inbox.append((run, early_token))
        if self.head_wakeup is not None and not self.head_wakeup.triggered:
            self._wake(self.head_wakeup, self.head_idle_since, delivered)

    def _at_next_probe(self, idle_since: float, action: Callable[[], None], delivered: float | None = None) -> None:
        """Run ``action`` now, or (a calibrated profile's polling) at the probe with which a rank idle since
        ``idle_since`` notices what has just arrived (``delivered``: when MPI delivered a message that the
        executor's link emulation held until now)."""
        now = self.env.now
        if self.polling is None:
            noticed = now
        elif delivered is not None and delivered < now:
            noticed = self.polling.noticed_held(idle_since, delivered, now)
        else:
            noticed = self.polling.noticed(idle_since, now)
        if noticed <= now:
            action()
        else:
            self.env.timeout(noticed - now).callbacks.append(lambda _timeout: action())

    def _wake(self, event: simpy.Event, idle_since: float, delivered: float | None = None) -> None:
        """Wake a waiting process at the probe that notices the message."""

        def wake() -> None:
            if not event.triggered:
                event.succeed()

        self._at_next_probe(idle_since, wake, delivered)

    def _send_cancel(self, run_ids: tuple[int, ...]) -> None:
        now = self.env.now
        for run_id in run_ids:
            self.records.append(("cancel_sent", now, now, self.node_names[0], run_id, 0, 0.0, 0, 0, ""))
        self.head_cancelled.update(run_ids)
        if len(self.stages) > 1:
            last = self.stages[-1]
            self._send(0, last.node, self.payloads.cancel(len(run_ids)), "cancel", -1,
                       lambda e, s=last: self._cancel_at(s, run_ids, e.value))

    def _cancel_at(self, stage: _Stage, run_ids: tuple[int, ...], delivered: float | None = None) -> None:
        """A cancellation reaches ``stage``: an idle stage notices it at its next poll, a busy one when it looks."""
        if stage.phase != "idle":
            self._cancel_unseen(stage, run_ids)
            return

        def probe() -> None:
            if stage.phase == "idle":
                self._notice_cancels(stage, run_ids)
            else:  # a run woke the stage first: it looks again before the forward or at a layer boundary
                self._cancel_unseen(stage, run_ids)

        self._at_next_probe(stage.idle_since, probe, delivered)

    def _cancel_unseen(self, stage: _Stage, run_ids: tuple[int, ...]) -> None:
        stage.unseen_cancels.extend(run_ids)
        if stage.phase == "compute":  # stop at the next layer boundary to look
            stage.phase = "finishing"
            stage.process.interrupt()

    def _notice_unseen(self, stage: _Stage) -> None:
        if stage.unseen_cancels:
            run_ids, stage.unseen_cancels = tuple(stage.unseen_cancels), []
            self._notice_cancels(stage, run_ids)

    def _notice_cancels(self, stage: _Stage, run_ids: tuple[int, ...]) -> None:
        """The stage sees the cancellation: it records it and passes it on towards stage 1."""
        now = self.env.now
        for run_id in run_ids:
            self.records.append(("cancel_seen", now, now, self.node_names[stage.node], run_id, 0, 0.0, 0, 0, ""))
        stage.cancelled.update(run_ids)
        if stage.index > 1:
            previous = self.stages[stage.index - 1]
            self._send(stage.node, previous.node, self.payloads.cancel(len(run_ids)), "cancel", -1,
                       lambda e, s=previous: self._cancel_at(s, run_ids, e.value))

    def _schedule_early_exit(self, stage: _Stage, run: Run, cost) -> float:
        """SPEED: if the run's exit layer is on this stage, send the early prediction when that layer is done.

        Returns the extra time the stage spends on the exit head (final norm + output head on one token).
        """
        exit_layer = run.meta.get("exit_layer")
        if exit_layer is None or not stage.layers[0] <= exit_layer < stage.layers[1]:
            return 0.0
        node = self.nodes[stage.node]
        exit_head = self.target_cost.output_head_time(node, 1)
        offset = node.overhead_per_run + (exit_layer - stage.layers[0] + 1) * cost.per_layer + exit_head
        position = run.last_position + 1
        right = self.acceptance.correct(position, 0)
        token = self.tokens.token(position) if right else self.tokens.wrong(position)

        def emit(_event) -> None:
            if stage.current != run.run_id:
                return  # aborted before reaching the exit layer
            self.records.append(("compute", self.env.now - exit_head, self.env.now, node.name, run.run_id, 1, 0.0, 0,
                                 0, f"exit{exit_layer}"))
            if stage.node == 0:
                self._deliver_to_head(run, token)
            else:
                self._send(stage.node, 0, self.payloads.header(1), "early-exit", run.run_id,
                           lambda e: self._deliver_to_head(run, token, e.value))

        self.env.timeout(offset).callbacks.append(emit)
        return exit_head

    # -- processes ---------------------------------------------------------------------------------
    def _stage_loop(self, stage: _Stage):
        env = self.env
        node = self.nodes[stage.node]
        name = node.name
        last = stage.index == len(self.stages) - 1
        records = self.records
        cost_of = self.target_cost.stage_cost
        while True:
            self._notice_unseen(stage)
            while not stage.queue:
                stage.wakeup = env.event()
                stage.idle_since = env.now
                stage.phase = "idle"
                yield stage.wakeup
            stage.phase = "dispatch"
            run, computed_upstream = stage.queue.popleft()
            if computed_upstream and run.run_id not in stage.cancelled:
                cost = cost_of(node, stage.n_layers, run.n_tokens, run.positions[0], run.n_outputs if last else 0)
                stage.current = run.run_id
                yield from self._dispatch(stage.node, cost, run)
                self._notice_unseen(stage)  # the executor looks once more before the forward
            if not computed_upstream or run.run_id in stage.cancelled:
                stage.current = None
                records.append(("skip", env.now, env.now, name, run.run_id, run.n_tokens, 0.0, 0, 0, ""))
                self._forward(stage, run, computed=False)
                continue
            start = env.now
            aborted = yield from self._compute(stage, cost, cost.total - cost.dispatch
                                               + self._schedule_early_exit(stage, run, cost))
            stage.current = None
            note = f"stage{stage.index}:aborted" if aborted else f"stage{stage.index}"
            records.append(("compute", start, env.now, name, run.run_id, run.n_tokens, 0.0, 0, 0, note))
            self._forward(stage, run, computed=not aborted)

    def _compute(self, stage: _Stage, cost, work: float):
        """The stage's forward of ``work`` seconds; returns True when a cancellation of it aborted it.

        A cancellation arriving meanwhile interrupts it; the stage finishes the layer in progress, looks at what
        arrived (passing it on), and stops there if its own run is cancelled, else goes on. As in the executor,
        the last look is after the last layer: a cancellation arriving during the output head is seen only once
        the run is complete (and its predictions are sent anyway).
        """
        done = 0.0
        layers_end = stage.n_layers * cost.per_layer
        while True:
            stage.phase = "compute"
            job = self.hosts.job(stage.node, work - done)
            try:
                yield from job.run()
                return False
            except simpy.Interrupt:
                done += job.done
            boundary = work
            if cost.per_layer > 0 and done < layers_end - 1e-12:  # the next layer boundary
                boundary = min(math.ceil(done / cost.per_layer - 1e-9) * cost.per_layer, layers_end)
            if boundary > done:
                yield from self.hosts.compute(stage.node, boundary - done)
                done = boundary
            self._notice_unseen(stage)
            if done >= work - 1e-12:
                return False
            if stage.current in stage.cancelled:
                return True

    def _dispatch(self, node: int, cost, run: Run):
        """A calibrated profile's per-run messaging and scheduling before the forward: busy, not computing."""
        if cost.dispatch <= 0:
            return
        start = self.env.now
        try:
            yield from self.hosts.compute(node, cost.dispatch)
        finally:
            self.records.append(("dispatch", start, self.env.now, self.node_names[node], run.run_id, run.n_tokens,
                                 0.0, 0, 0, ""))

    def _head_loop(self):
        env = self.env
        head = self.nodes[0]
        name = head.name
        stage0 = self.stages[0]
        single = len(self.stages) == 1
        records = self.records
        strategy = self.strategy
        verify_overhead = self.scenario.head.verify_overhead or (self.profile.verify_overhead if self.profile else 0.0)
        cost_of = self.target_cost.stage_cost
        while not self.finished.triggered:
            self._tick()
            if self.head_inbox:
                run, early_token = self.head_inbox.popleft()
                if early_token is not None:
                    self._execute(strategy.on_early_exit(run.run_id, early_token))
                    continue
                if verify_overhead > 0:
                    start = env.now
                    yield from self.hosts.compute(0, verify_overhead)
                    records.append(("compute", start, env.now, name, run.run_id, run.n_outputs, 0.0, 0, 0, "verify"))
                predictions = self.tokens.predictions(run.positions[run.output_from:])
                self._execute(strategy.on_logits(run.run_id, predictions))
                task = self.draft_task
                if task is not None and not strategy.wants_draft(task.request.request_id):
                    self.draft_task = None
                    self.draft_cache = self._draft_processed(task)
                    self._execute(strategy.on_draft(task.request.request_id, []))
            elif self.launch_queue:
                run = self.launch_queue.popleft()
                if run.run_id in self.head_cancelled:
                    records.append(("skip", env.now, env.now, name, run.run_id, run.n_tokens, 0.0, 0, 0, ""))
                    if not single:
                        self._forward(stage0, run, computed=False)
                    continue
                cost = cost_of(head, stage0.n_layers, run.n_tokens, run.positions[0], run.n_outputs if single else 0)
                stage0.current = run.run_id
                yield from self._dispatch(0, cost, run)
                start = env.now
                yield from self.hosts.compute(0, cost.total - cost.dispatch + self._schedule_early_exit(stage0, run, cost))
                stage0.current = None
                records.append(("compute", start, env.now, name, run.run_id, run.n_tokens, 0.0, 0, 0, "stage0"))
                self._forward(stage0, run, computed=True)
            elif self.draft_task is not None:
                task = self.draft_task
                batch = task.first_batch if task.step == 0 else 1
                context = task.context_start if task.step == 0 else task.context_start + task.first_batch + task.step - 1
                start = env.now
                yield from self.hosts.compute(0, self.draft_cost.model_cost(head, batch, context))
                records.append(("compute", start, env.now, name, -1, batch, 0.0, 0, 0, "draft"))
                task.step += 1
                if task.step == len(task.tokens):
                    self.draft_task = None
                    self.draft_cache = self._draft_processed(task)
                    self._execute(strategy.on_draft(task.request.request_id, task.tokens))
            else:
                self.head_wakeup = env.event()
                self.head_idle_since = env.now
                yield self.head_wakeup


def simulate(scenario: Scenario) -> Trace:
    """Simulate a scenario with its configured strategy (PipeSpec chains get the chain engine)."""
    if scenario.strategy.name in ("pipespec", "pipespec-sync"):
        from .chain_engine import ChainSimulationEngine

        return ChainSimulationEngine(scenario).run()
    return SimulationEngine(scenario).run()
