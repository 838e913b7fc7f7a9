"""The head rank: stage 0, the draft, and the scheduling core, driven with wall time and MPI messages.

It executes the strategy's actions exactly as ``pipesim.sim.engine.SimulationEngine`` does and works in the
same order of priority: returned predictions first, then launching runs through its own layers, then one draft
step at a time (abandoning a draft the strategy no longer wants), so a draft never delays a verification by more
than one draft step. Predictions are reduced to greedy ids (argmax of what returns) before the strategy sees them.
SPEED's early predictions (from the rank holding a run's exit layer, or from the head's own stage) share the
predictions' inbox, in arrival order; one asking the oracle (token -1) gets the simulator's oracle token.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..scheduling import (
    CancelRuns,
    EmitTokens,
    Finish,
    InvalidateRuns,
    LaunchRun,
    RequestDraft,
    Run,
    Strategy,
)
from ..trace import Record
from .backend import StageBackend
from .clock import Clock
from .drafts import Drafter, DraftTask
from .emulation import sleep_until
from .errors import ExecutorTimeout, InjectedFault
from .messaging import Messenger
from .protocol import (
    TAG_CANCEL,
    TAG_EARLY,
    TAG_PRED,
    TAG_RUN,
    EarlyExitMessage,
    PredictionMessage,
    ProtocolError,
    RunMessage,
    decode_early_exit,
    decode_predictions,
    encode_cancel,
    encode_run,
)


@dataclass
class HeadOutcome:
    """What the head measured: the committed tokens and its clock at start and finish."""

    output_tokens: list[int]
    t_start: float
    t_end: float
    max_partitions_used: int = 0


class Head:
    """The loop of rank 0 for one generation."""

    def __init__(self, strategy: Strategy, n_ranks: int, backend: StageBackend, drafter: Drafter | None,
                 messenger: Messenger, clock: Clock, records: list[Record], node_name: str, deadline: float,
                 verify_sleep: float = 0.0, fault: bool = False,
                 early_oracle: Callable[[int], int] | None = None) -> None:
        self.strategy = strategy
        self.n_ranks = n_ranks
        self.backend = backend
        self.drafter = drafter
        self.messenger = messenger
        self.clock = clock
        self.records = records
        self.name = node_name
        self.deadline = deadline
        self.verify_sleep = verify_sleep
        self.fault = fault
        self.early_oracle = early_oracle  # SPEED: the oracle's early prediction for a position
        self.inbox: deque[PredictionMessage | EarlyExitMessage] = deque()
        self.launch_queue: deque[Run] = deque()
        self.cancelled: set[int] = set()
        self.awaiting: set[int] = set()  # runs sent down the pipeline whose predictions are still wanted
        self.draft_task: DraftTask | None = None
        self.output: list[int] = []
        self.finished = False
        self.max_partitions_used = 0

    def run(self) -> HeadOutcome:
        """Generate until the strategy finishes; then send STOP down the pipeline."""
        t_start = self.clock.now()
        self._execute(self.strategy.start())
        while not self.finished:
            if time.monotonic() > self.deadline:
                raise ExecutorTimeout(f"generation did not finish in time ({len(self.output)} tokens so far; "
                                     f"{self.messenger.silence()})")
            self._pump()
            if self.inbox:
                message = self.inbox.popleft()
                if isinstance(message, EarlyExitMessage):
                    self._on_early_exit(message)
                else:
                    self._on_predictions(message)
            elif self.launch_queue:
                self._launch(self.launch_queue.popleft())
            elif self.draft_task is not None:
                self._draft_step(self.draft_task)
            elif self.awaiting:
                self.messenger.wait(self.deadline, f"predictions of runs {sorted(self.awaiting)[:8]}")
            else:
                raise RuntimeError("scheduling stalled: no run in flight, nothing to launch or draft, not finished")
        t_end = self.clock.now()
        if self.n_ranks > 1:
            self.messenger.send(1, TAG_RUN, encode_run(RunMessage.stop_message()))
        return HeadOutcome(self.output, t_start, t_end, self.max_partitions_used)

    # -- actions ---------------------------------------------------------------------------------------
    def _execute(self, actions) -> None:
        now = self.clock.now()
        records = self.records
        for action in actions:
            if isinstance(action, LaunchRun):
                run = action.run
                records.append(Record("launch", now, now, self.name, run.run_id, run.n_tokens, note=run.kind))
                self.launch_queue.append(run)
            elif isinstance(action, RequestDraft):
                if self.drafter is None:
                    raise RuntimeError(f"strategy {self.strategy.name!r} requested a draft but none is configured")
                self.draft_task = self.drafter.begin(action)
            elif isinstance(action, EmitTokens):
                self.output.extend(action.tokens)
                records.append(Record("tokens", now, now, self.name, -1, len(action.tokens),
                                      checked=action.n_drafted_checked, accepted=action.n_drafted_accepted))
            elif isinstance(action, InvalidateRuns):
                for run_id in action.run_ids:
                    records.append(Record("invalidate", now, now, self.name, run_id))
            elif isinstance(action, CancelRuns):
                self._send_cancel(action.run_ids, now)
            elif isinstance(action, Finish):
                self.finished = True
        pool = getattr(self.strategy, "pool", None)
        if pool is not None:
            self.max_partitions_used = max(self.max_partitions_used, pool.n_used)

    def _send_cancel(self, run_ids: tuple[int, ...], now: float) -> None:
        for run_id in run_ids:
            self.records.append(Record("cancel_sent", now, now, self.name, run_id))
        self.cancelled.update(run_ids)
        self.awaiting.difference_update(run_ids)
        if self.n_ranks > 1:
            self.messenger.send(self.n_ranks - 1, TAG_CANCEL, encode_cancel(run_ids))

    # -- work ------------------------------------------------------------------------------------------
    def _pump(self) -> None:
        self.messenger.poll()
        while (envelope := self.messenger.take()) is not None:
            if envelope.tag == TAG_PRED:
                self.inbox.append(decode_predictions(envelope.body, envelope.payload))
            elif envelope.tag == TAG_EARLY:
                self.inbox.append(decode_early_exit(envelope.body))
            else:
                raise ProtocolError(f"head: unexpected tag {envelope.tag} from rank {envelope.source}")

    def _on_early_exit(self, message: EarlyExitMessage) -> None:
        """SPEED: an early prediction (from a stage's real exit head, or -1: the oracle decides here)."""
        token = message.token
        if token < 0:
            if self.early_oracle is None:
                raise RuntimeError("an early exit asks the head's oracle, but none is configured")
            token = self.early_oracle(message.position)
        self._execute(self.strategy.on_early_exit(message.run_id, token))

    def _on_predictions(self, message: PredictionMessage) -> None:
        start = self.clock.now()
        if self.verify_sleep > 0:
            sleep_until(start + self.verify_sleep, self.clock.now)
        self.awaiting.discard(message.run_id)
        strategy = self.strategy
        self._execute(strategy.on_logits(message.run_id, message.greedy()))
        task = self.draft_task
        if task is not None and not strategy.wants_draft(task.request.request_id):
            self.draft_task = None
            self._execute(strategy.on_draft(task.request.request_id, []))
        self.records.append(Record("compute", start, self.clock.now(), self.name, message.run_id,
                                   message.n_outputs, note="verify"))

    def _launch(self, run: Run) -> None:
        msg = RunMessage.of_run(run)
        self.backend.apply_kv_ops(msg.kv_ops)
        if self.fault:
            raise InjectedFault(f"injected fault at run {run.run_id} (executor.fault_rank=0)")
        if run.run_id in self.cancelled:
            now = self.clock.now()
            self.records.append(Record("skip", now, now, self.name, run.run_id, run.n_tokens))
            if self.n_ranks > 1 and msg.kv_ops:  # only its KV operations matter downstream
                self.messenger.send(1, TAG_RUN, encode_run(msg.skipped()))
            return
        start = self.clock.now()
        out = self.backend.forward(msg, None, self._keep_alive, self._exit_to_inbox(msg))
        self.records.append(Record("compute", start, self.clock.now(), self.name, run.run_id, run.n_tokens,
                                   note="stage0"))
        if self.n_ranks == 1:
            self.inbox.append(out)
        else:
            self.messenger.send(1, TAG_RUN, encode_run(msg), out)
            self.awaiting.add(run.run_id)

    def _exit_to_inbox(self, msg: RunMessage):
        """SPEED with the exit layer on the head's own stage: the early prediction goes to its own inbox."""
        if msg.exit_layer is None:
            return None

        def on_exit(token: int, seconds: float) -> None:
            now = self.clock.now()
            self.records.append(Record("compute", now - seconds, now, self.name, msg.run_id, 1,
                                       note=f"exit{msg.exit_layer}"))
            self.inbox.append(EarlyExitMessage(msg.run_id, msg.positions[-1] + 1, token))

        return on_exit

    def _keep_alive(self) -> bool:
        """Between the head's own layers: let MPI progress; the head never cancels its own current run."""
        self.messenger.progress()
        return False

    def _draft_step(self, task: DraftTask) -> None:
        start = self.clock.now()
        batch = task.step()
        self.records.append(Record("compute", start, self.clock.now(), self.name, -1, batch, note="draft"))
        if task.done:
            self.draft_task = None
            self._execute(self.strategy.on_draft(task.request.request_id, task.tokens))
