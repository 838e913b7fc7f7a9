"""PipeInfer's reference KV bookkeeping as real messages: each transaction relayed hop by hop, applied by every stage.

In the reference every ``llama_kv_cache_seq_rm``/``seq_cp`` the head issues on the target context is a pipeline
transaction of its own (AutonomicPerfectionist/PipeInfer ``llama.cpp``: ``llama_kv_cache_seq_rm`` and
``llama_kv_cache_seq_cp`` send ``GGML_MPI_BEGIN_TRANSACTION`` and then the operation's values with
``ggml_mpi_sync_ints_pipelined``; ``ggml-mpi.c``, ``ggml_mpi_sync_pipelined``: every rank but the head receives
them from the previous rank, ``MPI_Bsend``s them to the next and then applies them to its own KV cache; a worker
meets them in ``llama_process_mpi_worker`` -> ``llama_process_mpi_transaction`` in the order the head issued them,
between the decodes around them). Here each transaction is one small message (``TAG_KVTX``: op, sequence ids,
positions; the reference's begin-transaction message and its values travel as one) sent ahead of the run it
precedes, whose header announces how many to expect; each stage forwards it to the next stage and applies it to
its own KV as soon as no queued run precedes it (so a burst flows down the pipeline while the head still sends it;
one that arrives behind a queued run waits for that run, in order, as the reference's single-threaded worker does) (real compute: the actual ``seq_rm``/``seq_cp`` on the torch KV cache, which is organised by sequence
ids as llama.cpp's is; emulated compute: received and forwarded only, since the message cost is now real). The
operations come from the strategy (``Strategy.relayed_kv_ops``; PipeInfer: ``reference_kv_transaction_ops``, the same loops ``reference_kv_transactions`` counts), so
the number of messages on every link equals the count the simulator charges.

Sends are synchronous (``Issend``) with a bounded window per link (``KV_WINDOW``), so a burst of thousands never
piles up in MPI's eager buffers; every wait is bounded by the generation's deadline.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

from ..scheduling import KVOp, Run, Strategy
from ..trace import Record
from .messaging import Messenger
from .protocol import TAG_KVTX, ProtocolError, decode_kv_transaction, encode_kv_transaction

KV_WINDOW = 64  # relayed transactions a stage may have sent that the next one has not received yet


def run_transactions(run: Run, strategy: Strategy) -> tuple[KVOp, ...]:
    """The relayed transactions that precede ``run``, as its strategy issues them (``relayed_kv_ops``), checked
    against the count its header announces."""
    ops = strategy.relayed_kv_ops(run)
    if len(ops) != run.kv_transactions:
        raise ProtocolError(f"run {run.run_id}: {len(ops)} KV transactions expanded, its header counts "
                            f"{run.kv_transactions}")
    return ops


def relay(run_id: int, ops: Sequence[KVOp], apply: Callable[[Sequence[KVOp]], None], messenger: Messenger,
          next_rank: int | None, deadline: float, records: list[Record], where: str,
          now: Callable[[], float], first: int = 0) -> None:
    """Forward each transaction (``first``: the index of the first within its run) to ``next_rank`` (None: the
    last stage) and apply it to this stage's KV, one by one as ``ggml_mpi_sync_pipelined`` does; one ``compute``
    record ``kv`` spans them (its count: how many)."""
    if not ops:
        return
    start = now()
    for index, op in enumerate(ops, start=first):
        if next_rank is not None:
            messenger.send_windowed(next_rank, TAG_KVTX, encode_kv_transaction(run_id, index, op), KV_WINDOW,
                                    deadline, f"KV transaction {index} of run {run_id}")
        apply((op,))
    records.append(Record("compute", start, now(), where, run_id, len(ops), what="kv"))


class TransactionInbox:
    """A stage's received transactions, in arrival order, until the run they precede is processed."""

    def __init__(self) -> None:
        self._queue: deque[tuple[int, int, KVOp]] = deque()

    def arrived(self, body) -> None:
        self._queue.append(decode_kv_transaction(body))

    def take(self, run_id: int, count: int, first: int = 0) -> list[KVOp]:
        """The ``count`` transactions of run ``run_id`` from index ``first`` (they arrived ahead of it, in order);
        ProtocolError if they did not."""
        ops = []
        for index in range(first, first + count):
            if not self._queue:
                raise ProtocolError(f"run {run_id} announces {count} KV transactions, {index} arrived before it")
            got_run, got_index, op = self._queue.popleft()
            if (got_run, got_index) != (run_id, index):
                raise ProtocolError(f"KV transaction {got_index} of run {got_run} where transaction {index} of run "
                                    f"{run_id} was due")
            ops.append(op)
        return ops

    def front(self) -> tuple[int, int, int]:
        """(run id, index, how many in a row of that run) of the transactions at the front."""
        run_id, index, _ = self._queue[0]
        count = 0
        for got_run, _, _ in self._queue:
            if got_run != run_id:
                break
            count += 1
        return run_id, index, count

    def __len__(self) -> int:
        return len(self._queue)


def time_relay_burst(messenger: Messenger, ops: Sequence[KVOp], apply: Callable[[Sequence[KVOp]], None],
                     previous_rank: int | None, next_rank: int | None, deadline: float) -> dict[str, float]:
    """Calibration: relay a burst of transactions down a pipeline as a generation does (the first rank sends and
    applies each, the others receive, forward and apply it) and time this rank's share of it: ``busy_s`` is the
    time it spent receiving, forwarding and applying them (not the time it waited for the previous rank, nor for
    the next rank's window), so ``busy_s / n`` is this node's time per relayed transaction; ``span_s`` is from
    its first transaction to its last."""
    inbox = TransactionInbox()
    window_before, receive_before = messenger.window_wait_s, messenger.receive_s
    handling = 0.0
    start = None
    for index, op in enumerate(ops):
        if previous_rank is not None:
            while not len(inbox):
                if not messenger.poll():
                    messenger.wait(deadline, f"KV transaction {index} of the calibration burst")
                while (envelope := messenger.take()) is not None:
                    if envelope.tag != TAG_KVTX:
                        raise ProtocolError(f"calibration burst: unexpected tag {envelope.tag}")
                    inbox.arrived(envelope.body)
            t0 = time.perf_counter()
            op = inbox.take(0, 1, first=index)[0]
        else:
            t0 = time.perf_counter()
        start = t0 if start is None else start
        if next_rank is not None:
            messenger.send_windowed(next_rank, TAG_KVTX, encode_kv_transaction(0, index, op), KV_WINDOW, deadline,
                                    f"KV transaction {index} of the calibration burst")
        apply((op,))
        handling += time.perf_counter() - t0
    span = time.perf_counter() - start if start is not None else 0.0
    window = messenger.window_wait_s - window_before
    busy = max(handling - window, 0.0) + messenger.receive_s - receive_before
    return {"n": len(ops), "span_s": span, "waited_for_next_s": window, "busy_s": busy}
