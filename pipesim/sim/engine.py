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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import simpy

from ..scenario import Scenario
from ..scheduling import RequestDraft, Run, Strategy, make_strategies
from ..scheduling.driver import DRAFT, STAGE0, VERIFY, HeadDriver
from ..scheduling.prefix import common_prefix_len
from ..scheduling.records import COMPUTE, DISPATCH, TRANSFER, Record
from ..scheduling.stage import ACTIVATIONS, HEADER, PREDICTIONS, StageMachine
from ..trace import Trace
from ..world.acceptance import level_predictor
from ..world.build import Pipeline, World, build_world
from ..world.network import LinkDirection
from .host_cpu import SharedHosts
from .polling import PollBackoff


class SimulationError(RuntimeError):
    """The simulation could not finish (e.g. it exceeded its event budget)."""


@dataclass
class _Stage:
    """Simulated state of one stage of a pipeline (stage 0 is its head's own layers: no machine)."""

    index: int
    node: int
    layers: tuple[int, int]
    machine: StageMachine | None
    wakeup: simpy.Event | None = None
    idle_since: float = 0.0
    unseen_cancels: list[int] = field(default_factory=list)  # arrived while busy; noticed at the next look
    phase: str = "idle"  # idle, dispatch, compute, finishing (the layer in progress after an interrupt)
    current: int | None = None
    process: simpy.Process | None = None
    to_next: LinkDirection | None = None  # the link to the next stage, once used
    n_layers: int = 0

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
        self.stages = [_Stage(k, node, span, StageMachine(k, n, names[node], engine.records, pipeline.level)
                              if k else None)
                       for k, (node, span) in enumerate(zip(pipeline.nodes, pipeline.layer_ranges, strict=True))]
        self.driver = HeadDriver(strategy, self, names[self.head_node], n, engine.records, pipeline.level)
        self.wakeup: simpy.Event | None = None
        self.idle_since = 0.0
        self.draft_cache: tuple[int, ...] = ()
        self.frame_bytes: dict[int, tuple[float, float]] = {}  # run id -> (header, with activations)
        tokens = engine.world.tokens
        self.level_oracle = not pipeline.is_target  # predictions from the run (its prefix), not its positions
        if pipeline.is_target:
            self.predict = tokens.predictions
        else:  # a draft model of a chain
            self.predict = level_predictor(tokens, engine.acceptance, pipeline.accuracy,
                                           max(p.accuracy for p in engine.world.pipelines[:-1]))

    # -- the driver's port -----------------------------------------------------------------------------
    def now(self) -> float:
        return self.engine.env.now

    def drop(self, run: Run, send_header: bool) -> None:
        if send_header:
            self.engine.forward(self, self.stages[0], run, HEADER)

    def send_cancel(self, run_ids: tuple[int, ...]) -> None:
        engine, last = self.engine, self.stages[-1]
        engine.send(self.head_node, last.node, self.pipeline.payloads.cancel(len(run_ids)), "cancel", -1,
                    lambda e: engine.cancel_at(self, last, run_ids, e.value), self.level)

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
        cached = min(common_prefix_len(self.draft_cache, context), len(context) - 1)
        proposal = self.engine.draft.propose(context, request.n_tokens, request.committed_len, request.min_confidence)
        return _DraftTask(request, proposal.tokens, first_batch=len(context) - cached, context_start=cached,
                          n_steps=proposal.n_steps)

    def end_draft(self, task: _DraftTask) -> None:
        """The draft model holds in its cache what the task's steps processed."""
        context = task.request.context
        self.draft_cache = context[:task.context_start] if task.step == 0 else context + tuple(task.tokens[:task.step - 1])

    def finish(self) -> None:
        if not self.engine.finished.triggered:
            self.engine.finished.succeed()


class SimulationEngine:
    """Simulate one scenario; ``run()`` returns the trace."""

    def __init__(self, scenario: Scenario, max_events: int = 50_000_000, world: World | None = None) -> None:
        self.scenario = scenario
        self.max_events = max_events
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
        self.network = world.network()
        self.acceptance = world.acceptance()
        self.draft = world.oracle_draft(self.acceptance)
        self.hosts = SharedHosts(self.env, world.host_of, world.concurrent_slowdown)
        self.records: list[tuple] = []  # plain tuples in Record's field order (fast); Records at the end
        self._head_iterations = 0
        self.finished = self.env.event()
        self.lines = [_Line(self, pipeline, strategy)
                      for pipeline, strategy in zip(world.pipelines, strategies, strict=True)]
        for line in self.lines:
            for stage in line.stages[1:]:
                stage.process = self.env.process(self._stage_loop(line, stage))
            self.env.process(self._head_loop(line))
        for line in self.lines:
            line.driver.start()
        self._run_bounded()
        new = tuple.__new__
        records = [new(Record, r) for r in self.records]
        target = self.lines[-1].driver
        meta = {"layer_ranges": list(world.target.layer_ranges), "prompt_tokens": len(prompt),
                "cost_models": world.cost_sources(), "warnings": list(world.warnings)}
        if len(self.lines) > 1:
            meta["chain"] = [[pipeline.spec.name for pipeline in world.pipelines]]
            meta["chain_nodes"] = [list(pipeline.nodes) for pipeline in world.pipelines]
        return Trace(engine="simulated", strategy=scenario.strategy.name, scenario=scenario.name,
                     nodes=self.node_names, t_start=0.0, t_end=self.env.now, records=records,
                     output_tokens=list(target.output), meta=meta)

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

    # -- messaging ---------------------------------------------------------------------------------
    def send(self, src: int, dst: int, nbytes: float, what: str, run_id: int, deliver, level: int = 0) -> None:
        self.send_on(self.network.link(src, dst), nbytes, what, run_id, deliver, level)

    def send_on(self, link, nbytes: float, what: str, run_id: int, deliver, level: int = 0) -> None:
        """A message on one direction of a link; ``deliver(event)`` runs at its arrival."""
        env = self.env
        now = env.now
        start, end, arrival = link.send(now, nbytes)
        self.records.append((TRANSFER, start, end, link.name, run_id, 0, nbytes, 0, 0, what, -1, level, False, False))
        # the event's value: when MPI has delivered the message, if the executor's link emulation then holds it
        # until ``arrival`` (a rank may find it earlier and sleep until then); None when it is there at arrival
        delivered = now + link.transport if self.held_messages else None
        env.timeout(arrival - now, value=delivered).callbacks.append(deliver)

    def forward(self, line: _Line, stage: _Stage, run: Run, what: str | None) -> None:
        """Send a run on from ``stage``: activations, a header, or predictions to the pipeline's head."""
        if what is None:
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
        sizes = line.frame_bytes.get(run.run_id)
        if sizes is None:  # the same frame at every stage: its header alone, and with activations
            payloads, counts = line.pipeline.payloads, (run.n_tokens, len(run.kv_ops), len(run.seq_ids),
                                                        "exit_layer" in run.meta)
            sizes = line.frame_bytes[run.run_id] = (payloads.header(*counts), payloads.activations(*counts))
        if stage.to_next is None:
            stage.to_next = self.network.link(stage.node, nxt.node)
        self.send_on(stage.to_next, sizes[computed], what, run.run_id,
                     lambda e: self._deliver_to_stage(nxt, run, computed, e.value), line.level)

    def _deliver_to_stage(self, stage: _Stage, run: Run, computed_upstream: bool,
                          delivered: float | None = None) -> None:
        stage.machine.arrive(run, computed_upstream)
        if stage.wakeup is not None and not stage.wakeup.triggered:
            self._wake(stage.wakeup, stage.idle_since, delivered)

    def _deliver_predictions(self, line: _Line, run: Run, delivered: float | None = None) -> None:
        predictions = line.predict(run) if line.level_oracle else line.predict(run.positions[run.output_from:])
        line.driver.predictions_arrived(run.run_id, predictions, run.n_outputs)
        if line.wakeup is not None and not line.wakeup.triggered:
            self._wake(line.wakeup, line.idle_since, delivered)

    def wake_head(self, line: _Line, delivered: float | None = None) -> None:
        if line.wakeup is not None and not line.wakeup.triggered:
            self._wake(line.wakeup, line.idle_since, delivered)

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

    def cancel_at(self, line: _Line, stage: _Stage, run_ids: tuple[int, ...], delivered: float | None = None) -> None:
        """A cancellation reaches ``stage``: an idle stage notices it at its next poll, a busy one when it looks."""
        if stage.phase != "idle":
            self._cancel_unseen(stage, run_ids)
            return

        def probe() -> None:
            if stage.phase == "idle":
                self._notice_cancels(line, stage, run_ids)
            else:  # a run woke the stage first: it looks again before the forward or at a layer boundary
                self._cancel_unseen(stage, run_ids)

        self._at_next_probe(stage.idle_since, probe, delivered)

    def _cancel_unseen(self, stage: _Stage, run_ids: tuple[int, ...]) -> None:
        stage.unseen_cancels.extend(run_ids)
        if stage.phase == "compute":  # stop at the next layer boundary to look
            stage.phase = "finishing"
            stage.process.interrupt()

    def _notice_unseen(self, line: _Line, stage: _Stage) -> None:
        if stage.unseen_cancels:
            run_ids, stage.unseen_cancels = tuple(stage.unseen_cancels), []
            self._notice_cancels(line, stage, run_ids)

    def _notice_cancels(self, line: _Line, stage: _Stage, run_ids: tuple[int, ...]) -> None:
        """The stage sees the cancellation; its machine says whether it passes it on towards stage 1."""
        if stage.machine.see_cancels(run_ids, self.env.now):
            previous = line.stages[stage.index - 1]
            self.send(stage.node, previous.node, line.pipeline.payloads.cancel(len(run_ids)), "cancel", -1,
                      lambda e: self.cancel_at(line, previous, run_ids, e.value), line.level)

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
            now = self.env.now
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

        self.env.timeout(offset).callbacks.append(emit)
        return exit_head

    # -- processes ---------------------------------------------------------------------------------
    def _stage_loop(self, line: _Line, stage: _Stage):
        env = self.env
        node = self.world.nodes[stage.node]
        machine = stage.machine
        queue = machine.queue
        take, computes, skipped, finished = queue.popleft, machine.computes, machine.skipped, machine.finished
        last = machine.is_last
        cost_of = line.pipeline.cost.stage_cost
        while True:
            self._notice_unseen(line, stage)
            while not queue:
                stage.wakeup = env.event()
                stage.idle_since = env.now
                stage.phase = "idle"
                yield stage.wakeup
            stage.phase = "dispatch"
            run, computed_upstream, _ = take()
            compute = computes(run, computed_upstream)
            if compute:
                cost = cost_of(node, stage.n_layers, run.n_tokens, run.positions[0], run.n_outputs if last else 0)
                stage.current = machine.current = run.run_id
                if cost.dispatch > 0:
                    yield from self._dispatch(stage.node, cost, run)
                    self._notice_unseen(line, stage)  # the executor looks once more before the forward
                    compute = computes(run, computed_upstream)
            if not compute:
                stage.current = machine.current = None
                self.forward(line, stage, run, skipped(run, env.now))
                continue
            start = env.now
            aborted = yield from self._compute(line, stage, cost, cost.total - cost.dispatch
                                               + self._schedule_early_exit(line, stage, run, cost))
            stage.current = None
            self.forward(line, stage, run, finished(run, start, env.now, aborted))

    def _compute(self, line: _Line, stage: _Stage, cost, work: float):
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
            self._notice_unseen(line, stage)
            if done >= work - 1e-12:
                return False
            if stage.machine.must_abort():
                return True

    def _dispatch(self, node: int, cost, run: Run):
        """A calibrated profile's per-run messaging and scheduling before the forward: busy, not computing."""
        if cost.dispatch <= 0:
            return
        start = self.env.now
        try:
            yield from self.hosts.compute(node, cost.dispatch)
        finally:
            self.records.append((DISPATCH, start, self.env.now, self.node_names[node], run.run_id, run.n_tokens,
                                 0.0, 0, 0, "", -1, 0, False, False))

    def _head_loop(self, line: _Line):
        env = self.env
        world = self.world
        head = world.nodes[line.head_node]
        stage0 = line.stages[0]
        single = len(line.stages) == 1
        driver = line.driver
        verify_overhead = world.verify_overhead
        cost_of = line.pipeline.cost.stage_cost
        draft_cost = world.draft_cost
        hosts, node = self.hosts, line.head_node
        finished = self.finished
        while not finished.triggered:
            self._tick()
            work = driver.next_work()
            if work is None:
                line.wakeup = env.event()
                line.idle_since = env.now
                yield line.wakeup
                continue
            kind, item = work
            start = env.now
            if kind is VERIFY:
                if verify_overhead > 0:
                    yield from hosts.compute(node, verify_overhead)
                driver.verify(item, start)
            elif kind is STAGE0:
                run = item
                cost = cost_of(head, stage0.n_layers, run.n_tokens, run.positions[0], run.n_outputs if single else 0)
                stage0.current = run.run_id
                yield from self._dispatch(node, cost, run)
                start = env.now
                yield from hosts.compute(node, cost.total - cost.dispatch
                                         + self._schedule_early_exit(line, stage0, run, cost))
                stage0.current = None
                driver.stage0_done(run, start)
                self.forward(line, stage0, run, PREDICTIONS if single else ACTIVATIONS)
            else:
                assert kind is DRAFT
                task = item
                batch = task.first_batch if task.step == 0 else 1
                context = task.context_start if task.step == 0 else task.context_start + task.first_batch + task.step - 1
                yield from hosts.compute(node, draft_cost.model_cost(head, batch, context))
                task.step += 1
                driver.draft_step_done(task, start, batch)


def simulate(scenario: Scenario) -> Trace:
    """Simulate a scenario with its configured strategy."""
    return SimulationEngine(scenario).run()
