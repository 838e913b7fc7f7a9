"""A worker rank: one stage of a pipeline after its head, driving the shared ``StageMachine``.

The machine decides (skip or compute, abort at a layer boundary, what goes on, whether a cancellation is passed
on towards stage 1); this module receives and sends the MPI messages and runs the forward. Before each run the
stage applies the run's KV operations, even when it then skips the run; it looks at what arrived once more
before the forward, and at every layer boundary while computing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..scheduling.stage import (
    ACTIVATIONS,
    HEADER,
    PREDICTIONS,
    SKIPPED_ACTIVATIONS,
    SKIPPED_PREDICTIONS,
    StageMachine,
)
from ..trace import Record
from .backend import StageBackend
from .clock import Clock
from .emulation import charge_kv_transactions
from .errors import InjectedFault
from .kv_relay import TransactionInbox, relay
from .messaging import Messenger
from .protocol import (
    TAG_CANCEL,
    TAG_DISCARD,
    TAG_EARLY,
    TAG_KVTX,
    TAG_PRED,
    TAG_RUN,
    EarlyExitMessage,
    PredictionMessage,
    ProtocolError,
    RunMessage,
    decode_cancel,
    decode_run,
    encode_cancel,
    encode_early_exit,
    encode_run,
    predictions_from_ids,
)


@dataclass(frozen=True)
class FullTraffic:
    """What a stage needs to send a run it did not compute on at full size (PipeInfer's reference)."""

    d_model: int
    vocab_size: int
    return_mode: str
    top_k: int


class Worker:
    """The loop of a stage after the first for one generation; ``run()`` returns at the generation's STOP.

    ``pipeline``: the ranks of its pipeline, head first (all ranks; in a PipeSpec chain, its level's ranks).
    """

    def __init__(self, rank: int, n_ranks: int, backend: StageBackend, messenger: Messenger, clock: Clock,
                 records: list[Record], node_name: str, deadline: float, fault: bool = False,
                 pipeline: Sequence[int] | None = None, level: int = 0, kv_transaction_time: float = 0.0,
                 full_traffic: FullTraffic | None = None, kv_messages: bool = True) -> None:
        self.rank = rank
        self.kv_transaction_time = kv_transaction_time
        self.kv_messages = kv_messages  # relayed KV transactions arrive as messages (else a modelled charge)
        self.kv_inbox = TransactionInbox()
        self._kv_relayed: dict[int, int] = {}  # run id -> its transactions relayed before the run arrived
        self.full_traffic = full_traffic
        pipeline = list(range(n_ranks)) if pipeline is None else list(pipeline)
        index = pipeline.index(rank)  # its stage in the pipeline (the rank itself by default)
        self.head = pipeline[0]
        self.next = pipeline[index + 1] if index + 1 < len(pipeline) else None
        self.previous = pipeline[index - 1]
        self.machine = StageMachine(index, len(pipeline), node_name, records, level, full_traffic is not None)
        self.backend = backend
        self.messenger = messenger
        self.clock = clock
        self.records = records
        self.name = node_name
        self.deadline = deadline
        self.fault = fault

    def run(self) -> None:
        machine = self.machine
        while True:
            self._pump()
            if not machine.queue:
                if len(self.kv_inbox):
                    self._relay_ahead()
                    continue
                self.messenger.wait(self.deadline, "a run or a cancellation")
                continue
            msg, computed, activations = machine.take()
            if msg.stop:
                if not machine.is_last:
                    self.messenger.send(self.next, TAG_RUN, encode_run(msg))
                return
            self._process(msg, computed, activations)

    # -- messages --------------------------------------------------------------------------------------
    def _pump(self) -> None:
        self.messenger.poll()
        while (envelope := self.messenger.take()) is not None:
            if envelope.tag == TAG_RUN:
                msg = decode_run(envelope.body)
                self.machine.arrive(msg, msg.computed, envelope.payload)
            elif envelope.tag == TAG_KVTX:
                self.kv_inbox.arrived(envelope.body)
            elif envelope.tag == TAG_CANCEL:
                run_ids = decode_cancel(envelope.body)
                if self.machine.see_cancels(run_ids, self.clock.now()):
                    self.messenger.send(self.previous, TAG_CANCEL, encode_cancel(run_ids))
            else:
                raise ProtocolError(f"rank {self.rank}: unexpected tag {envelope.tag} from rank {envelope.source}")

    def _relay_ahead(self) -> None:
        """Transactions with no run queued ahead of them: forward and apply them now, as the reference's worker
        does with each one it meets (``llama_process_mpi_worker``), so a burst flows down the pipeline while the
        head is still sending it; the run they precede takes the rest when it comes."""
        run_id, index, count = self.kv_inbox.front()
        done = self._kv_relayed.get(run_id, 0)
        if index != done:
            raise ProtocolError(f"rank {self.rank}: KV transaction {index} of run {run_id} where {done} was due")
        relay(run_id, self.kv_inbox.take(run_id, count, done), self.backend.apply_kv_ops, self.messenger, self.next,
              self.deadline, self.records, self.name, self.clock.now, done)
        self._kv_relayed[run_id] = done + count

    def _should_cancel(self) -> bool:
        self._pump()
        return self.machine.must_abort()

    # -- runs ------------------------------------------------------------------------------------------
    def _process(self, msg: RunMessage, computed: bool, activations: np.ndarray | None) -> None:
        machine = self.machine
        if self.kv_messages:  # forwarded and applied ahead of the run, whether it is then computed or skipped
            done = self._kv_relayed.pop(msg.run_id, 0)
            relay(msg.run_id, self.kv_inbox.take(msg.run_id, msg.kv_transactions - done, done),
                  self.backend.apply_kv_ops, self.messenger, self.next, self.deadline, self.records, self.name,
                  self.clock.now, done)
        else:
            charge_kv_transactions(msg, self.kv_transaction_time, self.clock.now, self.records, self.name)
        self.backend.apply_kv_ops(msg.kv_ops)
        if self.fault:
            raise InjectedFault(f"injected fault at run {msg.run_id} (executor.fault_rank={self.rank})")
        self._pump()  # a cancellation that came in while this run was received counts before the forward
        if not machine.computes(msg, computed):
            self._send_on(msg, machine.skipped(msg, self.clock.now()), None)
            return
        start = self.clock.now()
        machine.current = msg.run_id
        out = self.backend.forward(msg, activations, self._should_cancel, self._exit_sender(msg))
        self._send_on(msg, machine.finished(msg, start, self.clock.now(), aborted=out is None), out)

    def _send_on(self, msg: RunMessage, what: str | None, out) -> None:
        if what == HEADER:
            self.messenger.send(self.next, TAG_RUN, encode_run(msg.skipped()))
        elif what == ACTIVATIONS:
            self.messenger.send(self.next, TAG_RUN, encode_run(msg), out)
        elif what == PREDICTIONS:
            assert isinstance(out, PredictionMessage)
            body, payload = out.encode()
            self.messenger.send(self.head, TAG_PRED, body, payload)
        elif what == SKIPPED_ACTIVATIONS:  # a whole frame of activations nobody computed (PipeInfer's reference)
            self.messenger.send(self.next, TAG_RUN, encode_run(msg.skipped()),
                                np.zeros(msg.n_tokens * self.full_traffic.d_model, dtype=np.float32))
        elif what == SKIPPED_PREDICTIONS:  # full-size results of a run nobody computed: the head drops them
            traffic = self.full_traffic
            body, payload = predictions_from_ids(msg.run_id, [0] * msg.n_outputs, traffic.return_mode,
                                                 traffic.vocab_size, traffic.top_k).encode()
            self.messenger.send(self.head, TAG_DISCARD, body, payload)

    def _exit_sender(self, msg: RunMessage):
        """SPEED: send the early prediction to the head right after the exit layer (unless cancelled by then)."""
        if msg.exit_layer is None:
            return None

        def on_exit(token: int, seconds: float) -> None:
            if msg.run_id in self.machine.cancelled:
                return
            now = self.clock.now()
            self.records.append(Record("compute", now - seconds, now, self.name, msg.run_id, 1, what="exit",
                                       stage=msg.exit_layer))
            position = msg.positions[-1] + 1
            self.messenger.send(self.head, TAG_EARLY, encode_early_exit(EarlyExitMessage(msg.run_id, position, token)))

        return on_exit
