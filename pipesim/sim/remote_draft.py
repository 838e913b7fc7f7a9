"""The simulated draft on a node of its own (``placement.draft_node`` other than the head).

As in the executor (``executor/remote_draft.py``): when a draft starts, the head sends a request over the link
to the draft node; the draft node computes the draft's steps back to back on its own figures, sending a reply
after each (``world/draft_exchange.py`` names the reference's messages and their bytes); the head waits for each
reply. A draft the head abandons keeps the draft node busy until it notices the next request, at the end of the
step it is computing, as the executor's draft rank does. The draft node's compute is its own rank's: it does not
slow a stage on the same node (a calibrated profile's host sharing aside).
"""

from __future__ import annotations

from collections.abc import Callable

from ..scheduling.records import COMPUTE, TRANSFER
from ..world.draft_exchange import reply_bytes, request_bytes
from ..world.network import LinkDirection


class RemoteDraft:
    """The draft node's timeline: ``step()`` gives when the head has a step's reply."""

    def __init__(self, node: int, node_name: str, step_cost: Callable[[int, int], float], to_draft: LinkDirection,
                 to_head: LinkDirection, records: list, level: int = 0) -> None:
        self.node = node
        self.node_name = node_name
        self.step_cost = step_cost  # (tokens processed, context) -> seconds on the draft node
        self.to_draft = to_draft
        self.to_head = to_head
        self.records = records
        self.level = level
        self.free_at = 0.0  # when the draft node ends the step it is computing
        self.run_ahead: list[tuple[int, int]] = []  # steps of an abandoned draft it still computes: (batch, context)

    def step(self, now: float, first: bool, n_new: int, batch: int, context: int) -> float:
        """Step of a draft the head asks for at ``now`` (``first``: the request goes out, carrying ``n_new``
        tokens); returns when its reply reaches the head (the draft node's compute is recorded here)."""
        if first:
            start, end, arrival = self.to_draft.send(now, request_bytes(n_new))
            self._transfer(start, end, self.to_draft.name, request_bytes(n_new), "draft-request")
            self._finish_run_ahead(arrival)
            begin = max(arrival, self.free_at)
        else:
            begin = self.free_at
        end_compute = begin + self.step_cost(batch, context)
        self._compute(begin, end_compute, batch)
        self.free_at = end_compute
        start, end, arrival = self.to_head.send(end_compute, reply_bytes())
        self._transfer(start, end, self.to_head.name, reply_bytes(), "draft-reply")
        return max(arrival, now)

    def abandon(self, remaining: list[tuple[int, int]]) -> None:
        """The head dropped a draft with ``remaining`` steps (batch, context) the draft node goes on with."""
        self.run_ahead = list(remaining)

    def _finish_run_ahead(self, noticed: float) -> None:
        """Steps of an abandoned draft computed until the draft node notices the request at ``noticed``."""
        while self.run_ahead and self.free_at < noticed:
            batch, context = self.run_ahead.pop(0)
            begin = self.free_at
            self.free_at = begin + self.step_cost(batch, context)
            self._compute(begin, self.free_at, batch)
            start, end, _ = self.to_head.send(self.free_at, reply_bytes())
            self._transfer(start, end, self.to_head.name, reply_bytes(), "draft-reply")
        self.run_ahead = []

    def _compute(self, t0: float, t1: float, batch: int) -> None:
        self.records.append((COMPUTE, t0, t1, self.node_name, -1, batch, 0.0, 0, 0, "draft", -1, self.level, False,
                             False))

    def _transfer(self, t0: float, t1: float, link: str, nbytes: float, what: str) -> None:
        self.records.append((TRANSFER, t0, t1, link, -1, 0, nbytes, 0, 0, what, -1, self.level, False, False))
