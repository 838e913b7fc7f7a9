"""PipeInfer (Butler et al., SC'24): asynchronous pipelined speculation with early inference cancellation.

While the head waits for predictions it keeps drafting small micro-batches of tokens and launching them as
speculative runs, each chained on the previous run's last drafted token, next to a single-token
non-speculative run of each newly committed token. Every speculative run owns a KV partition (a sequence id)
from a bounded FIFO pool; it first copies its predecessor's sequence into its partition (``cp``), so its
tokens attend to the whole speculative chain. Once verified, accepted tokens are copied into the canonical
sequence and the partition is removed and returned to the pool. A mismatch invalidates every later run of the
chain; with early cancellation these runs are cancelled, and stages skip or abort them.

KV operations travel with the next launched run, so every stage applies them in the same order relative to
the runs around them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ..actions import Action, CancelRuns, InvalidateRuns, RequestDraft
from ..kv_pool import KVPartitionPool
from ..runs import CANONICAL_SEQ, KVOp, Run
from .base import Strategy

# Defaults of the paper's code and scripts: --draft 3, -pa 0.1 (p_accept), 1000 sequence partitions.
DEFAULT_MICRO_BATCH = 3
DEFAULT_MIN_CONFIDENCE = 0.1
DEFAULT_PARTITIONS = 1000


@dataclass
class _ChainLink:
    run: Run
    predictions: list[int] | None = None


class PipeInferStrategy(Strategy):
    """Continuous asynchronous speculation with early cancellation and KV multibuffering.

    Parameters: ``micro_batch`` drafted tokens per speculative run (1-4 in the paper), ``min_confidence`` the
    draft-probability cut-off below which drafting stops, ``max_runs_in_flight`` a bound on valid runs in the
    pipeline (None: bounded by the partition pool only, as in the paper's code), ``n_partitions`` the size of
    the KV partition pool, ``early_cancellation`` whether invalidated runs are cancelled. With ``kv_capacity``
    (set by the engine from the stages' KV caches) no speculation starts that would not fit them: the head waits
    for verifications to free partitions instead (back-pressure).
    """

    name = "pipeinfer"

    def __init__(self, prompt: Sequence[int], n_generate: int, micro_batch: int = DEFAULT_MICRO_BATCH,
                 min_confidence: float = DEFAULT_MIN_CONFIDENCE, max_runs_in_flight: int | None = None,
                 n_partitions: int = DEFAULT_PARTITIONS, early_cancellation: bool = True,
                 stop_tokens: Sequence[int] = ()) -> None:
        super().__init__(prompt, n_generate, stop_tokens)
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        if max_runs_in_flight is not None and max_runs_in_flight < 1:
            raise ValueError(f"max_runs_in_flight must be >= 1 or None, got {max_runs_in_flight}")
        self.micro_batch = micro_batch
        self.min_confidence = min_confidence
        self.max_runs_in_flight = max_runs_in_flight
        self.early_cancellation = early_cancellation
        self.pool = KVPartitionPool(n_partitions)
        self._chain: deque[_ChainLink] = deque()  # valid in-flight runs, in position order
        self._links: dict[int, _ChainLink] = {}
        self._drafted: deque[int] = deque()  # unverified drafted tokens at positions len(sequence)...
        self._draft_request: RequestDraft | None = None
        self._draft_epoch = 0
        self._epoch = 0  # bumped whenever the speculative continuation is thrown away
        self._draft_stalled = False
        self._spec_cells = 0  # KV cells the partitions of in-flight speculative runs hold (their own tokens)

    # -- events ------------------------------------------------------------------------------------
    def start(self) -> list[Action]:
        return [self._push(self._launch_prefill()), *self._speculate()]

    def on_logits(self, run_id: int, predictions: Sequence[int]) -> list[Action]:
        link = self._links.get(run_id)
        if link is None or self.done:  # an invalidated run finished anyway: nothing to learn from it
            return self._speculate()
        link.predictions = list(predictions)
        actions: list[Action] = []
        while self._chain and self._chain[0].predictions is not None and not self.done:
            actions.extend(self._resolve_front())
            self._draft_stalled = False
        actions.extend(self._speculate())
        return actions

    def on_draft(self, request_id: int, tokens: Sequence[int]) -> list[Action]:
        request, self._draft_request = self._draft_request, None
        if self.done or request is None or request.request_id != request_id:
            return []
        stale = self._draft_epoch != self._epoch or len(request.context) != len(self.sequence) + len(self._drafted)
        if stale:
            return self._speculate()
        if not tokens:  # the draft was not confident enough: wait for the next verification
            self._draft_stalled = True
            return []
        return [*self._launch_speculative(tokens), *self._speculate()]

    def wants_draft(self, request_id: int) -> bool:
        request = self._draft_request
        return (not self.done and request is not None and request.request_id == request_id
                and self._draft_epoch == self._epoch)

    # -- internals ---------------------------------------------------------------------------------
    def _launch_speculative(self, tokens: Sequence[int]) -> list[Action]:
        """Launch drafted tokens as a speculative run chained on the chain's last run, in a fresh partition."""
        partition = self.pool.acquire()
        if partition is None:
            return []
        previous = self._chain[-1].run
        source = previous.partition if previous.speculative else CANONICAL_SEQ
        self._queue_kv(KVOp("cp", source, dst=partition))
        launch = self._launch(list(tokens), len(self.sequence) + len(self._drafted), seq_ids=(partition,),
                              speculative=True, parent=previous.run_id, partition=partition, kind="spec")
        self._drafted.extend(tokens)
        self._spec_cells += len(tokens)
        return [self._push(launch)]

    def _push(self, launch):
        link = _ChainLink(launch.run)
        self._chain.append(link)
        self._links[launch.run.run_id] = link
        return launch

    def _speculate(self) -> list[Action]:
        """Ask for the next micro-batch of drafted tokens if the head may speculate now."""
        if self.done or self._draft_request is not None or self._draft_stalled or not self._chain:
            return []
        if self.max_runs_in_flight is not None and len(self._chain) >= self.max_runs_in_flight:
            return []
        if self.pool.n_free == 0 or not self._fits(self.micro_batch):
            return []
        context = (*self.sequence, *self._drafted)
        self._draft_request = RequestDraft(self._new_request_id(), context, self.micro_batch, len(self.sequence),
                                           self.min_confidence)
        self._draft_epoch = self._epoch
        return [self._draft_request]

    def _fits(self, n_tokens: int) -> bool:
        """Back-pressure: ``n_tokens`` more speculative tokens fit every stage's KV cache (its committed cells,
        the cell of the next token, the cells of the partitions in flight: partitions released meanwhile are
        removed by operations that travel ahead of the next run)."""
        if self.kv_capacity is None:
            return True
        return len(self.sequence) + 1 + self._spec_cells + n_tokens <= self.kv_capacity

    def _resolve_front(self) -> list[Action]:
        """Verify the oldest in-flight run against its predictions and commit what it decides."""
        link = self._chain.popleft()
        del self._links[link.run.run_id]
        run = link.run
        new_tokens: list[int] = []
        checked = accepted = 0
        chain_broken = False
        for position, predicted in zip(run.positions[run.output_from:], link.predictions or [], strict=False):
            if position + 1 != len(self.sequence) + len(new_tokens):
                continue  # this prediction decides a position already decided
            new_tokens.append(predicted)
            if not self._drafted:  # end of the speculative chain: the prediction is a bonus token
                chain_broken = True
                break
            checked += 1
            if self._drafted.popleft() != predicted:  # mismatch: the prediction is the correction
                chain_broken = True
                break
            accepted += 1
        actions: list[Action] = []
        if run.speculative:  # its drafted tokens before len(sequence) + accepted are committed
            self._retire_partition(run, len(self.sequence) + accepted)
        if chain_broken:
            actions.extend(self._invalidate_chain())
        actions.extend(self._commit(new_tokens, checked, accepted))
        if self.done:
            actions.extend(self._invalidate_chain())
        elif chain_broken:
            actions.append(self._push(self._launch([self.sequence[-1]], len(self.sequence) - 1)))
        return actions

    def _retire_partition(self, run: Run, committed_end: int) -> None:
        """Copy a verified run's accepted tokens (positions < ``committed_end``) to the canonical sequence; free it."""
        assert run.partition is not None
        last_committed = min(run.last_position + 1, committed_end)
        if last_committed > run.first_position:
            self._queue_kv(KVOp("cp", run.partition, dst=CANONICAL_SEQ, p0=run.first_position, p1=last_committed))
        self._queue_kv(KVOp("rm", run.partition))
        self.pool.release(run.partition)
        self._spec_cells -= run.n_tokens

    def _invalidate_chain(self) -> list[Action]:
        """Throw away every in-flight run and drafted token: cancel the runs and free their partitions."""
        self._epoch += 1
        self._drafted.clear()
        if not self._chain:
            return []
        run_ids = tuple(link.run.run_id for link in self._chain)
        for link in self._chain:
            del self._links[link.run.run_id]
            if link.run.speculative:
                self._queue_kv(KVOp("rm", link.run.partition))
                self.pool.release(link.run.partition)
                self._spec_cells -= link.run.n_tokens
        self._chain.clear()
        actions: list[Action] = [InvalidateRuns(run_ids)]
        if self.early_cancellation:
            actions.append(CancelRuns(run_ids))
        return actions

    @property
    def runs_in_flight(self) -> int:
        return len(self._chain)
