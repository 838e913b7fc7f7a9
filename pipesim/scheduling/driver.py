"""The head-side driver: the protocol around a strategy, written once for every engine.

A pipeline's head (rank 0, or a PipeSpec level's first node) holds the strategy, its own first stage and the
draft. The driver owns what the head decides: the launch queue, the cancelled and awaiting runs, the draft task,
the head's order of priority, and the records of all of it. Engines feed it events (predictions, early exits,
messages from other levels) and pull work from it (``next_work``), spending their own time on what it returns;
everything else they do through a small port:

- ``now()``                      the engine's clock
- ``drop(run, send_header)``     the head skips a cancelled run: its KV operations still apply, on the head's
                                 own stage and (``send_header``) down the pipeline as a header
- ``send_cancel(run_ids)``       a cancellation goes to the pipeline's last stage
- ``send_to_level(message)``     a message to another level of a chain (routed by the engine)
- ``begin_draft(request)``       a draft task (``.request``, ``.tokens``, ``.done``); ``end_draft(task)`` after it
- ``finish()``                   generation is complete

The head's order of priority is PipeInfer's (``examples/speculative/speculative.cpp``: returned logits are checked
before anything else is launched or drafted): returned predictions first, then messages from other levels (while
none of its runs is in the pipeline, for strategies that keep ``one_run_in_flight``, as PipeSpec's levels do),
then launching runs through its own layers, then one draft step at a time. A draft the strategy no longer wants
is abandoned after the predictions that made it stale.

A strategy whose ``head_priority`` is ``"run"`` (PipeInfer's reference) looks for returned predictions only
between whole speculative runs, as ``run_speculation_loop`` probes (``llama_mpi_iprobe``) only before each
``start_async_spec_run``: runs are launched through the head's layers as soon as they are made, and a draft task
once begun runs all its steps first.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from .actions import CancelRuns, EmitTokens, Finish, InvalidateRuns, LaunchRun, RequestDraft
from .records import CANCEL_SENT, COMPUTE, INVALIDATE, LAUNCH, SKIP, TOKENS, span, stage_compute
from .runs import Run
from .stage import forward_after_skip
from .strategies.base import Strategy

VERIFY = "verify"  # work: handle returned predictions (the engine charges the head's verification first)
STAGE0 = "stage0"  # work: compute a run through the head's own layers (the engine forwards it afterwards)
DRAFT = "draft"  # work: one draft step of the current draft task

_PREDICTIONS, _EARLY = 0, 1
_PRUNE_MIN = 64  # cancellations remembered before the first forgetting of runs already taken


class HeadPort(Protocol):
    """What the driver needs from an engine (see the module docstring)."""

    def now(self) -> float: ...

    def drop(self, run: Run, send_header: bool) -> None: ...

    def send_cancel(self, run_ids: tuple[int, ...]) -> None: ...

    def send_to_level(self, message: Any) -> None: ...

    def begin_draft(self, request: RequestDraft) -> Any: ...

    def end_draft(self, task: Any) -> None: ...

    def finish(self) -> None: ...


class HeadDriver:
    """The head of one pipeline (``n_stages`` stages, the head's own first) running ``strategy``; its records go
    to ``records`` as plain tuples in ``Record``'s field order."""

    def __init__(self, strategy: Strategy, port: HeadPort, where: str, n_stages: int, records: list,
                 level: int = 0) -> None:
        self.strategy = strategy
        self.port = port
        self.where = where
        self.n_stages = n_stages
        self.records = records
        self.level = level
        self.results: deque[tuple] = deque()  # (_PREDICTIONS, run_id, predictions, n_outputs) | (_EARLY, run_id, token)
        self.messages: deque = deque()  # from other levels of a chain
        self.launch_queue: deque[Run] = deque()
        self.cancelled: set[int] = set()  # cancelled runs the head may still take (ids > ``_taken``)
        self._taken = -1  # the id of the last run taken from the launch queue
        self._last_launched = -1
        self._prune_at = _PRUNE_MIN
        self.awaiting: set[int] = set()  # runs sent down the pipeline whose predictions are still due
        self.draft_task: Any = None
        self.output: list[int] = []
        self.finished = False
        self.defer_messages = strategy.one_run_in_flight
        self._pool = getattr(strategy, "pool", None)
        self.max_partitions_used = 0
        self.whole_runs = getattr(strategy, "head_priority", "step") == "run"
        self._draft_begun = False  # a step of the current draft task has run

    def start(self) -> None:
        self.execute(self.strategy.start())

    # -- events from the engine ------------------------------------------------------------------------
    def predictions_arrived(self, run_id: int, predictions, n_outputs: int) -> None:
        self.results.append((_PREDICTIONS, run_id, predictions, n_outputs))

    def early_exit_arrived(self, run_id: int, token: int) -> None:
        self.results.append((_EARLY, run_id, token))

    def message_arrived(self, message: Any) -> None:
        self.messages.append(message)

    # -- work ------------------------------------------------------------------------------------------
    def next_work(self) -> tuple[str, Any] | None:
        """The head's next piece of work, (VERIFY, item) | (STAGE0, run) | (DRAFT, task), or None: nothing to
        do until an event arrives. Work that takes no engine time (early exits, level messages, skipping a
        cancelled run) is done here."""
        strategy = self.strategy
        while not self.finished:
            if self.whole_runs:
                if self.launch_queue:
                    run = self._take_launch()
                    if run is not None:
                        return STAGE0, run
                    continue
                if self.draft_task is not None and self._draft_begun:
                    return DRAFT, self.draft_task
            if self.results:
                item = self.results.popleft()
                if item[0] == _EARLY:
                    self.execute(strategy.on_early_exit(item[1], item[2]))
                    continue
                return VERIFY, item
            if self.messages and not (self.defer_messages and self.awaiting):
                self.execute(strategy.on_message(self.messages.popleft()))
                continue
            if self.launch_queue:
                run = self._take_launch()
                if run is not None:
                    return STAGE0, run
                continue
            if self.draft_task is not None:
                return DRAFT, self.draft_task
            return None
        return None

    def _take_launch(self) -> Run | None:
        """The next run of the launch queue, or None when it was cancelled (the head skips it here)."""
        run = self.launch_queue.popleft()
        self._taken = run.run_id
        cancelled = self.cancelled
        if len(cancelled) > self._prune_at:  # runs are taken in id order: those before this one are gone
            cancelled = self.cancelled = {run_id for run_id in cancelled if run_id >= run.run_id}
            self._prune_at = max(_PRUNE_MIN, 2 * len(cancelled))
        if run.run_id not in cancelled:
            return run
        now = self.port.now()
        self.records.append((SKIP, now, now, self.where, run.run_id, run.n_tokens, 0.0, 0, 0, "", 0,
                             self.level, False, False))
        self.port.drop(run, forward_after_skip(run, self.n_stages == 1) is not None)
        self.execute(self.strategy.on_dropped(run.run_id))
        return None

    def waiting_for(self) -> str | None:
        """What the head is waiting for when ``next_work`` is None (None: nothing, the strategy stalled)."""
        if self.awaiting:
            return f"predictions of runs {sorted(self.awaiting)[:8]}"
        if self.strategy.expects_messages:
            return "a message from another level"
        return None

    def verify(self, item: tuple, start: float) -> None:
        """Predictions of a run, after the engine charged the head's verification from ``start``."""
        _, run_id, predictions, n_outputs = item
        self.awaiting.discard(run_id)
        strategy = self.strategy
        self.execute(strategy.on_logits(run_id, predictions))
        task = self.draft_task
        if task is not None and not strategy.wants_draft(task.request.request_id):
            self.draft_task = None
            self._draft_begun = False
            self.port.end_draft(task)
            self.execute(strategy.on_draft(task.request.request_id, []))
        now = self.port.now()
        if now > start:
            self.records.append(span(COMPUTE, start, now, self.where, run_id, n_outputs, "verify", level=self.level))

    def stage0_done(self, run: Run, start: float) -> None:
        """The head computed ``run`` through its own layers from ``start``; the engine sends it on."""
        self.records.append(stage_compute(start, self.port.now(), self.where, run.run_id, run.n_tokens, 0,
                                          self.level))
        if self.n_stages > 1:
            self.awaiting.add(run.run_id)

    def draft_step_done(self, task: Any, start: float, batch: int, remote: bool = False,
                        end: float | None = None) -> None:
        """One draft step of ``task`` (``batch`` tokens processed) from ``start`` to ``end`` (default: now);
        ``remote``: it ran on the draft's own node (placement.draft_node), which records its compute itself."""
        if not remote:
            self.records.append(span(COMPUTE, start, self.port.now() if end is None else end, self.where, -1, batch,
                                     "draft", level=self.level))
        self._draft_begun = True
        if task.done:
            self.draft_task = None
            self._draft_begun = False
            self.port.end_draft(task)
            self.execute(self.strategy.on_draft(task.request.request_id, task.tokens))

    # -- actions ---------------------------------------------------------------------------------------
    def execute(self, actions) -> None:
        """Carry out a strategy's actions, in order."""
        records, where, level = self.records, self.where, self.level
        now = self.port.now()
        for action in actions:
            kind = type(action)
            if kind is LaunchRun:
                run = action.run
                if run.run_id <= self._last_launched:  # stages forget cancellations by this order (StageMachine)
                    raise ValueError(f"{type(self.strategy).__name__} launched run {run.run_id} after run "
                                     f"{self._last_launched}: runs must be launched in the order of their ids")
                self._last_launched = run.run_id
                records.append((LAUNCH, now, now, where, run.run_id, run.n_tokens, 0.0, 0, 0, run.kind, -1, level,
                                run.speculative, False))
                self.launch_queue.append(run)
            elif kind is RequestDraft:
                self.draft_task = self.port.begin_draft(action)
                self._draft_begun = False
            elif kind is EmitTokens:
                self.output.extend(action.tokens)
                records.append((TOKENS, now, now, where, -1, len(action.tokens), 0.0, action.n_drafted_checked,
                                action.n_drafted_accepted, "", -1, level, False, False))
            elif kind is InvalidateRuns:
                for run_id in action.run_ids:
                    records.append((INVALIDATE, now, now, where, run_id, 0, 0.0, 0, 0, "", -1, level, False, False))
            elif kind is CancelRuns:
                self._cancel(action.run_ids, now)
            elif kind is Finish:
                if not self.finished:
                    self.finished = True
                    self.port.finish()
            else:  # a message to another level of a chain
                self.port.send_to_level(action)
        if self._pool is not None and self._pool.n_used > self.max_partitions_used:
            self.max_partitions_used = self._pool.n_used

    def _cancel(self, run_ids: tuple[int, ...], now: float) -> None:
        """Early cancellation: the head skips the runs it has not started; the stages hear of those it sent."""
        for run_id in run_ids:
            self.records.append((CANCEL_SENT, now, now, self.where, run_id, 0, 0.0, 0, 0, "", -1, self.level, False,
                                 False))
        self.cancelled.update(run_ids)
        sent = self.awaiting.intersection(run_ids)
        self.awaiting.difference_update(run_ids)
        if self.n_stages > 1 and sent:
            self.port.send_cancel(run_ids)
