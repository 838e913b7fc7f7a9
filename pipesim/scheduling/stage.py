"""The stage state machine: what a pipeline stage after the head does with runs and cancellations.

Written once, driven by the simulator's stage processes and the executor's worker ranks (the engines only decide
*when* a stage looks at what arrived, and what a forward costs). The rules, as PipeInfer's stages follow them
(AutonomicPerfectionist/PipeInfer, ``ggml-mpi.c`` ``ggml_mpi_graph_compute_pre``/``_post`` and the cancellation
probe in ``llama.cpp``):

- runs arrive in launch order; a run's KV operations are applied before it, even when the run is then skipped;
- a run cancelled before it starts, or not computed upstream, is skipped; it goes on as a header only, and only
  if it carries KV operations (later stages have nothing else to do with it);
- a stage that sees a cancellation records it and passes it on towards stage 1 (the head sent it to the last);
- a run cancelled while it is computed is aborted at the next layer boundary and goes on as a header;
- a computed run goes on as activations, or from the last stage as predictions to the pipeline's head.

With ``full_traffic`` (PipeInfer's reference, ``pipeinfer_cancelled_traffic: full``) a run a stage skips or aborts
still goes on as a whole activations frame and the last stage still returns its full logits: in ``llama.cpp``
``llama_decode_internal`` skips the compute of a cancelled batch but ``ggml_mpi_graph_compute_post`` sends the
buffer on, and the last rank sends ``n_vocab * n_tokens`` logits to the head all the same.
"""

from __future__ import annotations

from collections import deque

from .records import CANCEL_SEEN, COMPUTE, SKIP

_PRUNE_MIN = 64  # cancellations remembered before the first forgetting of those no run can ask about

ACTIVATIONS = "activations"
HEADER = "header"
PREDICTIONS = "predictions"
SKIPPED_ACTIVATIONS = "skipped-activations"  # full traffic: a whole activations frame of a run not computed
SKIPPED_PREDICTIONS = "skipped-predictions"  # full traffic: full logits of a run not computed, to the head


def forward_after_skip(run, is_last: bool) -> str | None:
    """What a stage sends on for a run it did not compute: a header when it carries KV operations (or counted KV
    transactions), else nothing."""
    return HEADER if (run.kv_ops or getattr(run, "kv_transactions", 0)) and not is_last else None


class StageMachine:
    """One stage (``index`` >= 1 of ``n_stages``) of a pipeline; ``records`` receives its records.

    Runs (``Run`` or the executor's ``RunMessage``: anything with ``run_id``, ``n_tokens`` and ``kv_ops``) are
    queued by ``arrive``; the engine takes the next with ``take``, applies its KV operations, asks ``computes``,
    and reports ``skipped`` or ``finished``, each of which answers what to send on (``ACTIVATIONS``, ``HEADER``,
    ``PREDICTIONS`` or None). Records go to ``records`` as plain tuples in ``Record``'s field order.
    """

    __slots__ = ("index", "is_last", "passes_cancels", "where", "level", "records", "queue", "cancelled", "current",
                 "full_traffic", "_floor", "_prune_at")

    def __init__(self, index: int, n_stages: int, where: str, records: list, level: int = 0,
                 full_traffic: bool = False) -> None:
        if not 1 <= index < n_stages:
            raise ValueError(f"stage index {index} is not a stage after the head of {n_stages} stages")
        self.index = index
        self.is_last = index == n_stages - 1
        self.passes_cancels = index > 1  # cancellations travel from the last stage back to stage 1
        self.where = where
        self.level = level
        self.records = records
        self.queue: deque = deque()
        self.cancelled: set[int] = set()  # cancelled runs that may still be asked about (ids >= ``_floor``)
        self.current: int | None = None
        self.full_traffic = full_traffic
        # runs arrive in launch order, which is their ids' order (``HeadDriver`` checks it): once the stage has
        # taken run r no run before it can come, so cancellations of those are forgotten (memory stays flat)
        self._floor = -1
        self._prune_at = _PRUNE_MIN

    # -- events ----------------------------------------------------------------------------------------
    def arrive(self, run, computed_upstream: bool, payload=None) -> None:
        """A run (activations when ``computed_upstream``, else a header) arrived from the previous stage."""
        self.queue.append((run, computed_upstream, payload))

    def see_cancels(self, run_ids: tuple[int, ...], now: float) -> bool:
        """The stage sees a cancellation; True when it must pass it on to the previous stage."""
        records, where, level = self.records, self.where, self.level
        for run_id in run_ids:
            records.append((CANCEL_SEEN, now, now, where, run_id, 0, 0.0, 0, 0, "", -1, level, False, False))
        self.cancelled.update(run_ids)
        return self.passes_cancels

    # -- decisions -------------------------------------------------------------------------------------
    def take(self):
        """The next queued (run, computed upstream, payload)."""
        return self.queue.popleft()

    def computes(self, run, computed_upstream: bool) -> bool:
        """Whether the stage computes the run it has taken (else it skips it)."""
        run_id = run.run_id
        if run_id > self._floor:
            self._floor = run_id
            if len(self.cancelled) > self._prune_at:
                self._prune()
        return computed_upstream and run_id not in self.cancelled

    def _prune(self) -> None:
        floor = self._floor
        self.cancelled = {run_id for run_id in self.cancelled if run_id >= floor}
        self._prune_at = max(_PRUNE_MIN, 2 * len(self.cancelled))

    def must_abort(self) -> bool:
        """At a layer boundary: the run in progress has been cancelled."""
        return self.current in self.cancelled

    # -- outcomes --------------------------------------------------------------------------------------
    def skipped(self, run, now: float) -> str | None:
        self.records.append((SKIP, now, now, self.where, run.run_id, run.n_tokens, 0.0, 0, 0, "", self.index,
                             self.level, False, False))
        return self._not_computed(run)

    def _not_computed(self, run) -> str | None:
        if self.full_traffic:
            return SKIPPED_PREDICTIONS if self.is_last else SKIPPED_ACTIVATIONS
        return forward_after_skip(run, self.is_last)

    def finished(self, run, t0: float, t1: float, aborted: bool) -> str | None:
        """The forward ended (``aborted``: cut short at a layer boundary); records it, says what goes on."""
        self.current = None
        self.records.append((COMPUTE, t0, t1, self.where, run.run_id, run.n_tokens, 0.0, 0, 0, "stage", self.index,
                             self.level, False, aborted))
        if aborted:
            return self._not_computed(run)
        return PREDICTIONS if self.is_last else ACTIVATIONS
