"""A level head of a PipeSpec chain: one model's state machine, its first stage, and messages to other levels.

Each model of the chain (``pipespec`` or ``pipespec-sync``) runs on its own group of ranks
(``scenario.chain_node_groups()``, drafts first, the target last). The group's first rank is the *level head*:
it runs the level's state machine (``PipeSpecLevel`` / ``LockstepLevel``) and its first stage; the group's other
ranks are ordinary workers (``worker.Worker`` over the group), and predictions come back to the level head. The
levels talk only through their heads (``TAG_CHAIN``), exactly as ``pipesim.sim.chain_engine`` routes them.

Like the simulator's level process, a level head handles messages from other levels only while none of its
runs is in its pipeline (it evaluates one run at a time, and a message waits until that run's predictions are
back): so a ``CancelLevelRun`` can only hit a run not started yet, which is then skipped (its KV operations
still travel) and reported with no predictions. Each level draws run ids from its own arithmetic progression
(``level + 1``, step ``n_levels``), so ids are unique across the chain without a shared counter.

At the end the target's level head tells every other level head (FINISH); each head then sends STOP down its own
pipeline and every rank drains, as in a plain generation.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..scheduling import EmitTokens, Finish, LaunchRun, Run
from ..scheduling.strategies.pipespec import (
    CancelLevelRun,
    LockstepLevel,
    PipeSpecLevel,
    SendProgress,
    SendRollback,
    SendTokens,
    StartRound,
)
from ..trace import Record
from .backend import StageBackend
from .clock import Clock
from .errors import ExecutorTimeout, InjectedFault
from .messaging import Messenger
from .protocol import (
    TAG_CHAIN,
    TAG_PRED,
    TAG_RUN,
    PredictionMessage,
    ProtocolError,
    RunMessage,
    decode_chain,
    decode_predictions,
    encode_chain,
    encode_run,
)

_MESSAGES = (SendTokens, SendRollback, SendProgress, StartRound)


def make_level(level: int, n_levels: int, prompt: Sequence[int], n_generate: int, params: dict,
               stop_tokens: Sequence[int] = ()):
    """The state machine of ``level``, as ``make_pipespec_chain`` builds it, with run ids unique to the level."""
    params = dict(params)
    cls = LockstepLevel if params.pop("synchronous", False) else PipeSpecLevel
    run_ids = itertools.count(level + 1, n_levels)
    return cls(level, n_levels, prompt, n_generate, run_ids, stop_tokens=stop_tokens, **params)


def oracle_predictor(tokens, uniform: Callable[[int], float], accuracy: float) -> Callable[[Run], list[int]]:
    """Level predictions as the simulator makes them: the reference token at a position where the position's
    uniform is below the level's ``accuracy``, else the same wrong token for every wrong level."""

    def predict(run: Run) -> list[int]:
        out = []
        for p in run.positions[run.output_from:]:
            right = accuracy >= 1.0 or uniform(p + 1) < accuracy
            out.append(tokens.token(p + 1) if right else tokens.wrong(p + 1))
        return out

    return predict


@dataclass
class ChainOutcome:
    """What a level head measured: the committed tokens (target only) and its clock at start and finish."""

    output_tokens: list[int]
    t_start: float
    t_end: float


class ChainHead:
    """The loop of a level head for one generation."""

    def __init__(self, machine, level: int, pipeline: Sequence[int], level_heads: Sequence[int],
                 backend: StageBackend, messenger: Messenger, clock: Clock, records: list[Record], node_name: str,
                 deadline: float, predict: Callable[[Run], list[int]] | None = None, fault: bool = False) -> None:
        self.machine = machine
        self.level = level
        self.pipeline = list(pipeline)
        self.level_heads = list(level_heads)
        self.is_target = level == len(level_heads) - 1
        self.backend = backend
        self.messenger = messenger
        self.clock = clock
        self.records = records
        self.name = node_name
        self.deadline = deadline
        self.predict = predict  # oracle: overrides the level's own predictions
        self.fault = fault
        self.results: deque[tuple[int, list[int]]] = deque()
        self.messages: deque = deque()
        self.launch_queue: deque[Run] = deque()
        self.cancelled: set[int] = set()
        self.runs: dict[int, Run] = {}
        self.in_pipeline: int | None = None  # the run sent down the level's pipeline, predictions awaited
        self.output: list[int] = []
        self.stopped = False

    def run(self) -> ChainOutcome:
        """Run the level until the chain finishes; then stop its pipeline (the target tells the others)."""
        t_start = self.clock.now()
        self._execute(self.machine.start())
        while not self.stopped:
            if time.monotonic() > self.deadline:
                raise ExecutorTimeout(f"level {self.level}: generation did not finish in time "
                                      f"({len(self.output)} tokens so far)")
            self._pump()
            if self.stopped:
                break
            if self.results:
                run_id, predictions = self.results.popleft()
                self._execute(self.machine.on_result(run_id, predictions))
            elif self.messages and self.in_pipeline is None:
                self._execute(self.machine.on_message(self.messages.popleft()))
            elif self.launch_queue:
                self._launch(self.launch_queue.popleft())
            else:
                what = (f"predictions of run {self.in_pipeline}" if self.in_pipeline is not None
                        else "a message from another level")
                self.messenger.wait(self.deadline, f"level {self.level}: {what}")
        t_end = self.clock.now()
        if self.is_target:
            for rank in self.level_heads[:-1]:
                self.messenger.send(rank, TAG_CHAIN, encode_chain(None))
        if len(self.pipeline) > 1:
            self.messenger.send(self.pipeline[1], TAG_RUN, encode_run(RunMessage.stop_message()))
        return ChainOutcome(self.output, t_start, t_end)

    # -- actions ---------------------------------------------------------------------------------------
    def _execute(self, actions) -> None:
        now = self.clock.now()
        for action in actions:
            if isinstance(action, LaunchRun):
                run = action.run
                self.records.append(Record("launch", now, now, self.name, run.run_id, run.n_tokens,
                                           note="spec" if run.speculative else f"L{self.level}"))
                self.runs[run.run_id] = run
                self.launch_queue.append(run)
            elif isinstance(action, _MESSAGES):
                self.messenger.send(self.level_heads[action.to_level], TAG_CHAIN, encode_chain(action))
            elif isinstance(action, CancelLevelRun):
                self.cancelled.add(action.run_id)
                self.records.append(Record("invalidate", now, now, self.name, action.run_id))
                self.records.append(Record("cancel_sent", now, now, self.name, action.run_id))
            elif isinstance(action, EmitTokens):
                self.output.extend(action.tokens)
                self.records.append(Record("tokens", now, now, self.name, -1, len(action.tokens),
                                           checked=action.n_drafted_checked, accepted=action.n_drafted_accepted))
            elif isinstance(action, Finish):
                self.stopped = True

    # -- messages --------------------------------------------------------------------------------------
    def _pump(self) -> None:
        self.messenger.poll()
        while (envelope := self.messenger.take()) is not None:
            if envelope.tag == TAG_PRED:
                self._on_predictions(decode_predictions(envelope.body, envelope.payload))
            elif envelope.tag == TAG_CHAIN:
                message = decode_chain(envelope.body)
                if message is None:  # FINISH from the target's level head
                    self.stopped = True
                else:
                    self.messages.append(message)
            else:
                raise ProtocolError(f"level {self.level} head: unexpected tag {envelope.tag} "
                                    f"from rank {envelope.source}")

    def _on_predictions(self, message: PredictionMessage) -> None:
        run_id = message.run_id
        if run_id == self.in_pipeline:
            self.in_pipeline = None
        self._result(run_id, message.greedy())

    def _result(self, run_id: int, predictions: list[int]) -> None:
        run = self.runs.pop(run_id, None)
        if run is None or run_id in self.cancelled:
            self.results.append((run_id, []))  # stale: reported with no predictions
            return
        if self.predict is not None:
            predictions = self.predict(run)
        self.results.append((run_id, predictions))

    # -- work ------------------------------------------------------------------------------------------
    def _launch(self, run: Run) -> None:
        msg = RunMessage.of_run(run)
        self.backend.apply_kv_ops(msg.kv_ops)
        if self.fault:
            raise InjectedFault(f"injected fault at run {run.run_id} (executor.fault_rank={self.pipeline[0]})")
        single = len(self.pipeline) == 1
        if run.run_id in self.cancelled:
            now = self.clock.now()
            self.records.append(Record("skip", now, now, self.name, run.run_id, run.n_tokens))
            if not single and msg.kv_ops:  # only its KV operations matter downstream
                self.messenger.send(self.pipeline[1], TAG_RUN, encode_run(msg.skipped()))
            self._result(run.run_id, [])
            return
        start = self.clock.now()
        out = self.backend.forward(msg, None, self._keep_alive)
        self.records.append(Record("compute", start, self.clock.now(), self.name, run.run_id, run.n_tokens,
                                   note="stage0"))
        if single:
            assert isinstance(out, PredictionMessage)
            self._result(run.run_id, out.greedy())
        else:
            self.messenger.send(self.pipeline[1], TAG_RUN, encode_run(msg), out)
            self.in_pipeline = run.run_id

    def _keep_alive(self) -> bool:
        self.messenger.progress()
        return False
