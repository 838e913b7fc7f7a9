"""Point-to-point messaging of one rank: non-blocking sends, polled receives, link emulation, clean drain.

Sends are ``Isend`` of contiguous numpy buffers, kept alive until complete. Receives poll with ``Iprobe`` (a
waiting rank sleeps between polls, backing off from 50 us to ``poll_interval``, so it never spins a core); a
frame's payload is received with ``Irecv`` and the message is delivered once complete, in order per sender.
With link emulation a message is delivered no earlier than its modelled arrival. The receiver writes the
``transfer`` record of each message: the modelled serialisation span with link emulation, otherwise from the
send stamp to the receiver's last probe that did not find it yet (a lower bound: the time a busy receiver took to
look is not counted as link time).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from ..trace import Record
from .clock import Clock
from .emulation import LinkEmulator
from .errors import ExecutorTimeout
from .protocol import DATA_TAGS, PAYLOAD_OFFSET, TAG_KVTX, ProtocolError, describe, frame, unframe

MIN_SLEEP = 50e-6


@dataclass
class Envelope:
    """A received message: its tag, sender, int64 body and float32 payload (None if it has none)."""

    tag: int
    source: int
    body: np.ndarray
    payload: np.ndarray | None
    due: float  # local time from which it may be delivered
    request: MPI.Request | None = None  # the payload's Irecv while in progress

    def complete(self) -> bool:
        if self.request is None:
            return True
        if self.request.Test():
            self.request = None
            return True
        return False


class Messenger:
    """A rank's mailbox and outbox for the data messages of one generation."""

    def __init__(self, comm: MPI.Comm, clock: Clock, node_names: list[str], records: list[Record],
                 link: LinkEmulator | None, poll_interval: float) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.clock = clock
        self.node_names = node_names
        self.records = records
        self.link = link
        self.poll_interval = poll_interval
        self.sent = np.zeros(self.size, dtype=np.int64)
        self.received = np.zeros(self.size, dtype=np.int64)
        self._sending: list[tuple[list[MPI.Request], tuple[np.ndarray, np.ndarray | None]]] = []
        self._incoming: dict[int, deque[Envelope]] = {}
        self._ready: deque[Envelope] = deque()
        self._status = MPI.Status()
        self._last_empty_probe = clock.now()  # when this rank last found nothing more to receive
        self._started = time.monotonic()
        self._last_heard: dict[int, float] = {}  # source rank -> time.monotonic() of its last message
        self._synchronous: dict[int, deque[MPI.Request]] = {}  # dst -> its windowed sends, oldest first
        self.window_wait_s = 0.0  # time spent waiting for a full window to drain (``send_windowed``)
        self.receive_s = 0.0  # time spent receiving messages (not looking for them): calibration reads it

    # -- sending ---------------------------------------------------------------------------------------
    def send(self, dst: int, tag: int, body: np.ndarray, payload: np.ndarray | None = None) -> None:
        """Send a frame (and its payload on ``tag + 1``) without blocking."""
        if payload is not None:
            payload = np.ascontiguousarray(payload, dtype=np.float32).reshape(-1)
        data = frame(body, self.clock.head_now(), payload)
        requests = [self.comm.Isend(data, dest=dst, tag=tag)]
        if payload is not None:
            requests.append(self.comm.Isend(payload, dest=dst, tag=tag + PAYLOAD_OFFSET))
        self._sending.append((requests, (data, payload)))
        self.sent[dst] += 1

    def send_windowed(self, dst: int, tag: int, body: np.ndarray, window: int, deadline: float, what: str) -> None:
        """Send a small frame synchronously (``Issend``: complete once ``dst`` has received it) with at most
        ``window`` of them unreceived per destination, so a burst never piles up in MPI's eager buffers. While the
        window is full this rank keeps receiving (its neighbours may be waiting on it) and sleeps between polls;
        ExecutorTimeout past ``deadline``."""
        pending = self._synchronous.setdefault(dst, deque())
        sleep = MIN_SLEEP
        waited_from = None
        while True:
            while pending and pending[0].Test():
                pending.popleft()
            if len(pending) < window:
                break
            waited_from = time.perf_counter() if waited_from is None else waited_from
            if time.monotonic() > deadline:
                raise ExecutorTimeout(f"timed out waiting for rank {dst} to take {what} ({self.silence()})")
            self._receive_arrived()
            time.sleep(sleep)
            sleep = min(2 * sleep, self.poll_interval)
        if waited_from is not None:
            self.window_wait_s += time.perf_counter() - waited_from
        data = frame(body, self.clock.head_now(), None)
        request = self.comm.Issend(data, dest=dst, tag=tag)
        pending.append(request)
        self._sending.append(([request], (data, None)))
        self.sent[dst] += 1

    def progress(self) -> None:
        """Let MPI progress and forget completed sends."""
        if self._sending:
            self._sending = [entry for entry in self._sending if not MPI.Request.Testall(entry[0])]

    # -- receiving -------------------------------------------------------------------------------------
    def poll(self) -> bool:
        """Receive what has arrived; True when a message is ready for delivery."""
        self.progress()
        self._receive_arrived()
        self._collect_ready(ignore_due=False)
        return bool(self._ready)

    def take(self) -> Envelope | None:
        """The next delivered message, or None."""
        return self._ready.popleft() if self._ready else None

    def wait(self, deadline: float, what: str) -> None:
        """Sleep until a message is ready (polling with backoff); ExecutorTimeout past ``deadline``."""
        sleep = MIN_SLEEP
        while not self.poll():
            if time.monotonic() > deadline:
                raise ExecutorTimeout(f"timed out waiting for {what} ({self.silence()})")
            pause = sleep
            next_due = self._next_due()
            if next_due is not None:
                pause = min(pause, max(next_due - self.clock.now(), MIN_SLEEP))
            time.sleep(pause)
            sleep = min(2 * sleep, self.poll_interval)

    def take_tag(self, tag: int) -> Envelope | None:
        """The first delivered message with ``tag`` (others stay, in order), or None."""
        for i, envelope in enumerate(self._ready):
            if envelope.tag == tag:
                del self._ready[i]
                return envelope
        return None

    def wait_tag(self, tag: int, deadline: float, what: str) -> Envelope:
        """Sleep until a message with ``tag`` is delivered (polling with backoff, others kept for later)."""
        sleep = MIN_SLEEP
        while True:
            self.poll()
            envelope = self.take_tag(tag)
            if envelope is not None:
                return envelope
            if time.monotonic() > deadline:
                raise ExecutorTimeout(f"timed out waiting for {what} ({self.silence()})")
            time.sleep(sleep)
            sleep = min(2 * sleep, self.poll_interval)

    def silence(self) -> str:
        """Who this rank last heard from and how long ago: names the rank or link that stopped answering."""
        now = time.monotonic()
        if not self._last_heard:
            return f"no message from any rank in {now - self._started:.1f} s"
        quiet = sorted(self._last_heard.items(), key=lambda item: item[1])[:4]
        parts = [f"rank {source} ({self.node_names[source]}->{self.node_names[self.rank]}) silent for "
                 f"{now - heard:.1f} s" for source, heard in quiet]
        never = [str(peer) for peer in range(self.size) if peer != self.rank and peer not in self._last_heard]
        if never and len(never) <= 4:
            parts.append(f"never heard from rank {', '.join(never)}")
        return "; ".join(parts)

    def _next_due(self) -> float | None:
        fronts = [queue[0].due for queue in self._incoming.values() if queue]
        return min(fronts) if fronts else None

    def _receive_arrived(self) -> None:
        comm, status = self.comm, self._status
        seen_empty = self._last_empty_probe
        while self._probe(comm, status):
            received_from = time.perf_counter()
            source, tag = status.Get_source(), status.Get_tag()
            if tag not in DATA_TAGS:
                raise ProtocolError(f"rank {self.rank}: unexpected message with tag {tag} from rank {source}")
            data = np.empty(status.Get_count(MPI.INT64_T), dtype=np.int64)
            comm.Recv(data, source=source, tag=tag)
            self.received[source] += 1
            self._last_heard[source] = time.monotonic()
            now = self.clock.now()
            sent_at, count, body = unframe(data)
            payload = request = None
            if count >= 0:
                payload = np.empty(count, dtype=np.float32)
                request = comm.Irecv(payload, source=source, tag=tag + PAYLOAD_OFFSET)
            nbytes = data.nbytes + (payload.nbytes if payload is not None else 0)
            note, run_id = describe(tag, body, payload is not None)
            if self.link is not None:
                start, end, arrival = self.link.arrival(source, self.rank, sent_at, nbytes)
                t0, t1, due = self.clock.to_local(start), self.clock.to_local(end), self.clock.to_local(arrival)
            else:  # not there at the last empty probe: it arrived after it (a lower bound of the transfer)
                t0 = min(self.clock.to_local(sent_at), now)
                t1, due = min(max(t0, seen_empty), now), now
            link_name = f"{self.node_names[source]}->{self.node_names[self.rank]}"
            if tag != TAG_KVTX or not self._merge_transaction(t0, t1, link_name, run_id, nbytes):
                self.records.append(Record("transfer", t0, t1, link_name, run_id, int(tag == TAG_KVTX),
                                           float(nbytes), what=note))
            self._incoming.setdefault(source, deque()).append(Envelope(tag, source, body, payload, due, request))
            self.receive_s += time.perf_counter() - received_from
        self._last_empty_probe = self.clock.now()

    def _merge_transaction(self, t0: float, t1: float, link: str, run_id: int, nbytes: int) -> bool:
        """Fold a relayed KV transaction into the transfer record just before it when that is one of the same run
        on the same link (thousands arrive per verification): its ``n_tokens`` counts the messages, ``nbytes``
        sums them, its span grows to cover an overlapping one (a zero-length lower bound stays one, so the link's
        busy time is unchanged). False when it cannot be folded."""
        if not self.records:
            return False
        last = self.records[-1]
        if not (isinstance(last, Record) and last.kind == "transfer" and last.what == "kv-transaction"
                and last.where == link and last.run_id == run_id):
            return False
        if t0 <= last.t1:
            span = {"t1": max(last.t1, t1)}
        elif last.t0 == last.t1 and t0 == t1:
            span = {}
        else:
            return False
        self.records[-1] = last._replace(n_tokens=last.n_tokens + 1, nbytes=last.nbytes + nbytes, **span)
        return True

    @staticmethod
    def _probe(comm: MPI.Comm, status: MPI.Status) -> bool:
        """Is a message waiting? MPICH's Iprobe matches before it makes progress, so a message that came in while
        this rank slept is only seen by a second call; one call per wake-up would notice it a whole sleep late."""
        return (comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
                or comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status))

    def _collect_ready(self, ignore_due: bool) -> None:
        now = self.clock.now()
        batch: list[Envelope] = []
        for queue in self._incoming.values():
            while queue and (ignore_due or queue[0].due <= now) and queue[0].complete():
                batch.append(queue.popleft())
        batch.sort(key=lambda e: e.due)
        self._ready.extend(batch)

    # -- end of a generation ---------------------------------------------------------------------------
    def drain(self, deadline: float) -> int:
        """Finish all sends and receive (and drop) every message still addressed to this rank.

        Call once this rank sends nothing more. Ranks exchange how many frames each sent to each, then
        receive until the counts match, so no message is left in flight. Returns the number dropped.
        """
        dropped = 0
        pause = min(self.poll_interval, 2e-4)

        def discard() -> int:
            self._receive_arrived()
            self._collect_ready(ignore_due=True)
            n = len(self._ready)
            self._ready.clear()
            return n

        while self._sending:
            self.progress()
            dropped += discard()
            self._check(deadline, "this rank's sends to complete")
            time.sleep(pause)
        expected = np.zeros(self.size, dtype=np.int64)
        request = self.comm.Ialltoall(self.sent, expected)
        while not request.Test():
            dropped += discard()
            self._check(deadline, "all ranks to finish the generation")
            time.sleep(pause)
        while np.any(self.received < expected) or any(self._incoming.values()):
            dropped += discard()
            self._check(deadline, "messages still in flight")
            time.sleep(pause)
        return dropped

    @staticmethod
    def _check(deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise ExecutorTimeout(f"timed out waiting for {what}")
