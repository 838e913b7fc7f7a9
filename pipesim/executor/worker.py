"""A worker rank: one target stage between the head and the next stage.

Runs arrive in order from the previous rank (a header, plus activations when computed upstream). Before each run
the stage applies the run's KV operations, even when it then skips the run. A run cancelled before it starts (or
not computed upstream) is skipped and only its header goes on (when it carries KV operations), so later stages
still apply them; a run cancelled while computing is aborted at the next layer boundary. Cancellations arrive
from the next rank (the head, for the last stage), are applied at once and passed on to the previous rank, down
to rank 1.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from ..trace import Record
from .backend import StageBackend
from .clock import Clock
from .errors import InjectedFault
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
    decode_cancel,
    decode_run,
    encode_cancel,
    encode_early_exit,
    encode_run,
)


class Worker:
    """The loop of a stage after the first for one generation; ``run()`` returns at the generation's STOP.

    ``pipeline``: the ranks of its pipeline, head first (all ranks; in a PipeSpec chain, its level's ranks).
    """

    def __init__(self, rank: int, n_ranks: int, backend: StageBackend, messenger: Messenger, clock: Clock,
                 records: list[Record], node_name: str, deadline: float, fault: bool = False,
                 pipeline: Sequence[int] | None = None) -> None:
        self.rank = rank
        # the ranks of this rank's pipeline in order, its head first (a PipeSpec level; default: all ranks)
        pipeline = list(range(n_ranks)) if pipeline is None else list(pipeline)
        self.index = index = pipeline.index(rank)  # its stage in the pipeline (the rank itself by default)
        self.head = pipeline[0]
        self.next = pipeline[index + 1] if index + 1 < len(pipeline) else None
        self.previous = pipeline[index - 1] if index > 1 else None  # cancellations go back down to index 1
        self.last = self.next is None
        self.backend = backend
        self.messenger = messenger
        self.clock = clock
        self.records = records
        self.name = node_name
        self.deadline = deadline
        self.fault = fault
        self.queue: deque[tuple[RunMessage, np.ndarray | None]] = deque()
        self.cancelled: set[int] = set()
        self.current: int | None = None

    def run(self) -> None:
        while True:
            self._pump()
            if not self.queue:
                self.messenger.wait(self.deadline, "a run or a cancellation")
                continue
            msg, activations = self.queue.popleft()
            if msg.stop:
                if not self.last:
                    self.messenger.send(self.next, TAG_RUN, encode_run(msg))
                return
            self._process(msg, activations)

    # -- messages --------------------------------------------------------------------------------------
    def _pump(self) -> None:
        self.messenger.poll()
        while (envelope := self.messenger.take()) is not None:
            if envelope.tag == TAG_RUN:
                self.queue.append((decode_run(envelope.body), envelope.payload))
            elif envelope.tag == TAG_CANCEL:
                self._on_cancel(decode_cancel(envelope.body))
            else:
                raise ProtocolError(f"rank {self.rank}: unexpected tag {envelope.tag} from rank {envelope.source}")

    def _on_cancel(self, run_ids: tuple[int, ...]) -> None:
        now = self.clock.now()
        for run_id in run_ids:
            self.records.append(Record("cancel_seen", now, now, self.name, run_id))
        self.cancelled.update(run_ids)
        if self.previous is not None:
            self.messenger.send(self.previous, TAG_CANCEL, encode_cancel(run_ids))

    def _should_cancel(self) -> bool:
        self._pump()
        return self.current in self.cancelled

    # -- runs ------------------------------------------------------------------------------------------
    def _process(self, msg: RunMessage, activations: np.ndarray | None) -> None:
        self.backend.apply_kv_ops(msg.kv_ops)
        if self.fault:
            raise InjectedFault(f"injected fault at run {msg.run_id} (executor.fault_rank={self.rank})")
        self._pump()  # a cancellation that came in while this run was received counts before the forward
        if not msg.computed or msg.run_id in self.cancelled:
            now = self.clock.now()
            self.records.append(Record("skip", now, now, self.name, msg.run_id, msg.n_tokens))
            self._forward_header(msg)
            return
        start = self.clock.now()
        self.current = msg.run_id
        out = self.backend.forward(msg, activations, self._should_cancel, self._exit_sender(msg))
        self.current = None
        aborted = out is None
        note = f"stage{self.index}:aborted" if aborted else f"stage{self.index}"
        self.records.append(Record("compute", start, self.clock.now(), self.name, msg.run_id, msg.n_tokens, note=note))
        if aborted:
            self._forward_header(msg)
        elif self.last:
            assert isinstance(out, PredictionMessage)
            body, payload = out.encode()
            self.messenger.send(self.head, TAG_PRED, body, payload)
        else:
            self.messenger.send(self.next, TAG_RUN, encode_run(msg), out)

    def _forward_header(self, msg: RunMessage) -> None:
        """A run not computed here goes on as a header only, and only if it carries KV operations (as in the
        simulator: later stages have nothing else to do with it)."""
        if not self.last and msg.kv_ops:
            self.messenger.send(self.next, TAG_RUN, encode_run(msg.skipped()))

    def _exit_sender(self, msg: RunMessage):
        """SPEED: send the early prediction to the head right after the exit layer (unless cancelled by then)."""
        if msg.exit_layer is None:
            return None

        def on_exit(token: int, seconds: float) -> None:
            if msg.run_id in self.cancelled:
                return
            now = self.clock.now()
            self.records.append(Record("compute", now - seconds, now, self.name, msg.run_id, 1,
                                       note=f"exit{msg.exit_layer}"))
            position = msg.positions[-1] + 1
            self.messenger.send(self.head, TAG_EARLY, encode_early_exit(EarlyExitMessage(msg.run_id, position, token)))

        return on_exit
