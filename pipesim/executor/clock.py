"""One clock for all ranks: ``MPI.Wtime`` locally, and each rank's offset to the head estimated by ping-pong."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import ExecutorTimeout
from .protocol import TAG_CLOCK

PING_ROUNDS = 8


@dataclass
class Clock:
    """A rank's clock: ``now()`` is its local ``MPI.Wtime``; ``offset`` is local minus head time."""

    wtime: Callable[[], float]
    offset: float = 0.0

    def now(self) -> float:
        return self.wtime()

    def head_now(self) -> float:
        return self.wtime() - self.offset

    def to_head(self, local: float) -> float:
        return local - self.offset

    def to_local(self, head: float) -> float:
        return head + self.offset


def offset_from_samples(samples: list[tuple[float, float, float]]) -> float:
    """Offset (remote minus local) from ping-pong samples ``(t_send, t_remote, t_back)``: the least-RTT sample,
    assuming the remote stamped its reply half-way through the round trip."""
    if not samples:
        raise ValueError("no ping-pong samples")
    t0, remote, t1 = min(samples, key=lambda s: s[2] - s[0])
    return remote - (t0 + t1) / 2.0


def _poll(comm, source: int, tag: int, deadline: float, sleep: float, what: str) -> None:
    while not comm.Iprobe(source=source, tag=tag):
        if time.monotonic() > deadline:
            raise ExecutorTimeout(f"timed out waiting for {what} from rank {source}")
        if sleep:
            time.sleep(sleep)


def sync_clocks(comm, clock: Clock, deadline: float, rounds: int = PING_ROUNDS) -> list[float]:
    """Estimate every rank's offset to the head and tell each rank its own; returns all offsets (head: all).

    The head pings each rank ``rounds`` times; a rank answers with its ``Wtime``. Waiting for the first
    ping sleeps (a rank may still be loading); the rounds themselves poll without sleeping (milliseconds).
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    buf = np.zeros(1, dtype=np.float64)
    if rank == 0:
        offsets = [0.0] * size
        for peer in range(1, size):
            samples = []
            for _ in range(rounds):
                t0 = clock.now()
                comm.Send(np.asarray([t0]), dest=peer, tag=TAG_CLOCK)
                _poll(comm, peer, TAG_CLOCK, deadline, 0.0, "a clock reply")
                comm.Recv(buf, source=peer, tag=TAG_CLOCK)
                samples.append((t0, float(buf[0]), clock.now()))
            offsets[peer] = offset_from_samples(samples)
            comm.Send(np.asarray([offsets[peer]]), dest=peer, tag=TAG_CLOCK)
        return offsets
    for i in range(rounds):
        _poll(comm, 0, TAG_CLOCK, deadline, 0.0005 if i == 0 else 0.0, "a clock ping")
        comm.Recv(buf, source=0, tag=TAG_CLOCK)
        comm.Send(np.asarray([clock.now()]), dest=0, tag=TAG_CLOCK)
    _poll(comm, 0, TAG_CLOCK, deadline, 0.0, "the clock offset")
    comm.Recv(buf, source=0, tag=TAG_CLOCK)
    clock.offset = float(buf[0])
    return [clock.offset]
