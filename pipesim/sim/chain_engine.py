"""The SimPy engine for PipeSpec chains: one process per model of the chain, each on its own nodes.

Each level (model) evaluates one run at a time through the nodes it is split over (a pipeline of its own:
stage compute, activations to the next node, predictions back to the level's first node) and talks to the other
levels only by messages over the links between their first nodes. Level i's token at a position equals the
target's when a per-position uniform is below its accuracy (the levels are coupled: a more accurate model is
right wherever a less accurate one is), otherwise every wrong level proposes the same wrong token, as related
models tend to.
"""

from __future__ import annotations

from collections import deque

import simpy

from ..placement import split_layers
from ..scenario import Scenario
from ..scheduling import EmitTokens, Finish, LaunchRun, Run
from ..scheduling.strategies.pipespec import (
    CancelLevelRun,
    SendProgress,
    SendRollback,
    SendTokens,
    StartRound,
    make_pipespec_chain,
)
from ..trace import Record, Trace
from .engine import SimulationEngine, SimulationError

_MESSAGES = (SendTokens, SendRollback, SendProgress, StartRound)


class _Level:
    def __init__(self, index: int, nodes: list[int], layer_ranges: list[tuple[int, int]], cost, accuracy: float):
        self.index = index
        self.nodes = nodes
        self.layer_ranges = layer_ranges
        self.cost = cost
        self.accuracy = accuracy
        self.inbox: deque = deque()
        self.pending: deque[Run] = deque()
        self.cancelled: set[int] = set()
        self.wakeup: simpy.Event | None = None


class ChainSimulationEngine(SimulationEngine):
    """Simulate a PipeSpec chain (``pipespec`` or ``pipespec-sync``) described by a scenario."""

    def __init__(self, scenario: Scenario, max_events: int = 50_000_000) -> None:
        super().__init__(scenario, max_events)
        from ..world.costs import RooflineCostModel

        specs = scenario.models.chain_specs()
        groups = scenario.chain_node_groups()
        accuracies = [*scenario.chain_alphas(), 1.0]
        self.levels = [
            _Level(i, group, split_layers(spec.n_layers, None, len(group)),
                   RooflineCostModel(spec, scenario.models.kv_bytes), accuracies[i])
            for i, (spec, group) in enumerate(zip(specs, groups, strict=True))
        ]

    def run(self, strategy=None) -> Trace:
        scenario = self.scenario
        prompt = [self.tokens.token(p) for p in range(scenario.workload.prompt_tokens)]
        params = scenario.strategy.params()
        self.chain = make_pipespec_chain(prompt, scenario.workload.generate_tokens, len(self.levels), **params)
        self.env = simpy.Environment()
        self.records = []
        self.output_tokens = []
        self.finished = self.env.event()
        self._head_iterations = 0
        for level in self.levels:
            self.env.process(self._level_loop(level))
        for level, machine in zip(self.levels, self.chain, strict=True):
            self._execute_level(level, machine.start())
        self._run_bounded()
        records = list(map(Record._make, self.records))
        return Trace(engine="simulated", strategy=scenario.strategy.name, scenario=scenario.name,
                     nodes=self.node_names, t_start=0.0, t_end=self.env.now, records=records,
                     output_tokens=self.output_tokens,
                     meta={"chain": [[spec.name for spec in scenario.models.chain_specs()]],
                           "chain_nodes": [level.nodes for level in self.levels]})

    # -- actions -----------------------------------------------------------------------------------
    def _execute_level(self, level: _Level, actions) -> None:
        now = self.env.now
        head = self.node_names[level.nodes[0]]
        for action in actions:
            if isinstance(action, LaunchRun):
                run = action.run
                self.records.append(("launch", now, now, head, run.run_id, run.n_tokens, 0.0, 0, 0,
                                     "spec" if run.speculative else f"L{level.index}"))
                level.pending.append(run)
                self._wake(level)
            elif isinstance(action, _MESSAGES):
                self._send_message(level, self.levels[action.to_level], action)
            elif isinstance(action, CancelLevelRun):
                level.cancelled.add(action.run_id)
                self.records.append(("invalidate", now, now, head, action.run_id, 0, 0.0, 0, 0, ""))
                self.records.append(("cancel_sent", now, now, head, action.run_id, 0, 0.0, 0, 0, ""))
            elif isinstance(action, EmitTokens):
                self.output_tokens.extend(action.tokens)
                self.records.append(("tokens", now, now, head, -1, len(action.tokens), 0.0,
                                     action.n_drafted_checked, action.n_drafted_accepted, ""))
            elif isinstance(action, Finish):
                if not self.finished.triggered:
                    self.finished.succeed()

    def _send_message(self, source: _Level, target: _Level, message) -> None:
        n_tokens = len(getattr(message, "tokens", getattr(message, "sequence", ())))
        nbytes = self.payloads.header_bytes + 4.0 * n_tokens
        src, dst = source.nodes[0], target.nodes[0]

        def deliver(_event) -> None:
            target.inbox.append(message)
            self._wake(target)

        self._send(src, dst, nbytes, type(message).__name__, -1, deliver)

    @staticmethod
    def _wake(level: _Level) -> None:
        if level.wakeup is not None and not level.wakeup.triggered:
            level.wakeup.succeed()

    def _predict(self, level: _Level, position: int) -> int:
        right = level.accuracy >= 1.0 or self.acceptance.uniform(position) < level.accuracy
        return self.tokens.token(position) if right else self.tokens.wrong(position)

    # -- process -----------------------------------------------------------------------------------
    def _level_loop(self, level: _Level):
        env = self.env
        machine = self.chain[level.index]
        while not self.finished.triggered:
            self._tick()
            if level.inbox:
                self._execute_level(level, machine.on_message(level.inbox.popleft()))
            elif level.pending:
                run = level.pending.popleft()
                completed = yield from self._evaluate(level, run)
                predictions = ([self._predict(level, p + 1) for p in run.positions[run.output_from:]]
                               if completed else [])
                self._execute_level(level, machine.on_result(run.run_id, predictions))
            else:
                level.wakeup = env.event()
                yield level.wakeup

    def _evaluate(self, level: _Level, run: Run):
        """Run through the level's nodes; False if it was cancelled (checked before each node)."""
        env = self.env
        n = len(level.nodes)
        for j, (node_index, (a, b)) in enumerate(zip(level.nodes, level.layer_ranges, strict=True)):
            node = self.nodes[node_index]
            if run.run_id in level.cancelled:
                self.records.append(("skip", env.now, env.now, node.name, run.run_id, run.n_tokens, 0.0, 0, 0, ""))
                return False
            last = j == n - 1
            cost = level.cost.stage_cost(node, b - a, run.n_tokens, run.positions[0], run.n_outputs if last else 0)
            start = env.now
            yield env.timeout(cost.total)
            self.records.append(("compute", start, env.now, node.name, run.run_id, run.n_tokens, 0.0, 0, 0,
                                 f"stage{j}"))
            if not last:
                nbytes = self.payloads.header(run.n_tokens) + run.n_tokens * level.cost.spec.d_model * \
                    self.payloads.activation_bytes
                yield from self._transfer(node_index, level.nodes[j + 1], nbytes, "activations", run.run_id)
            elif n > 1:
                nbytes = self.payloads.header_bytes + run.n_outputs * (
                    level.cost.spec.vocab_size * 4.0 if self.payloads.return_mode == "logits" else 8.0)
                yield from self._transfer(node_index, level.nodes[0], nbytes, "predictions", run.run_id)
        return True

    def _transfer(self, src: int, dst: int, nbytes: float, note: str, run_id: int):
        link = self.network.link(src, dst)
        start, end, arrival = link.send(self.env.now, nbytes)
        self.records.append(("transfer", start, end, link.name, run_id, 0, nbytes, 0, 0, note))
        yield self.env.timeout(arrival - self.env.now)


def simulate_chain(scenario: Scenario) -> Trace:
    """Simulate a PipeSpec chain scenario."""
    if scenario.strategy.name not in ("pipespec", "pipespec-sync"):
        raise SimulationError(f"strategy {scenario.strategy.name!r} is not a chain strategy")
    return ChainSimulationEngine(scenario).run()
