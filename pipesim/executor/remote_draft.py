"""The draft on a rank of its own (``placement.draft_node`` with no target layers), as PipeInfer's script runs it.

The reference keeps the draft's ranks in lockstep with the head by broadcasts on a two-rank communicator
(``world/draft_exchange.py`` cites them). Here the head's ``RemoteDrafter`` sends a draft request when a draft
starts: the tokens the draft has not processed (what the head knows it holds is kept, the rest rolled back) and
how many tokens to draft. The ``DraftServer`` on the draft rank then computes the steps back to back with its
runner (emulated sleep on the draft node's figures, free, or a real model), sending a reply after each (token,
confidence, tokens processed), and goes on until the draft is complete, the draft is not confident enough, or
the head's next request arrives (it looks between steps). The head waits for each reply; an oracle's proposals
replace the replied tokens on the head, as with a local draft. The byte sizes are ``world/draft_exchange.py``'s,
which the simulator charges too.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from ..scheduling import RequestDraft
from ..scheduling.prefix import common_prefix_len
from ..trace import Record
from ..world.acceptance import OracleDraft, TreeProposal
from ..world.draft_exchange import REPLY_VALUES, REQUEST_HEAD
from .clock import Clock
from .drafts import DraftRunner
from .errors import InjectedFault
from .messaging import Messenger
from .protocol import DRAFT_REPLY, DRAFT_REQUEST, TAG_DRAFT, ProtocolError

STOP_TASK = -1  # a request with this task id ends the draft rank's loop


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(bits)))[0]


def encode_request(task_id: int, keep: int, n_tokens: int, min_confidence: float | None,
                   tokens: list[int]) -> np.ndarray:
    """A draft request (``min_confidence`` None: never stop early, an oracle's proposals replace the tokens)."""
    head = [DRAFT_REQUEST, task_id, keep, n_tokens, 0 if min_confidence is None else 1,
            _float_bits(min_confidence or 0.0)]
    assert len(head) == REQUEST_HEAD
    return np.asarray(head + list(tokens), dtype=np.int64)


def decode_request(body: np.ndarray) -> tuple[int, int, int, float | None, list[int]]:
    if body.size < REQUEST_HEAD or int(body[0]) != DRAFT_REQUEST:
        raise ProtocolError(f"malformed draft request of {body.size} values")
    _, task_id, keep, n_tokens, stops, bits = (int(v) for v in body[:REQUEST_HEAD])
    return task_id, keep, n_tokens, _bits_float(bits) if stops else None, [int(v) for v in body[REQUEST_HEAD:]]


def encode_reply(task_id: int, step: int, token: int, confidence: float, n_fed: int) -> np.ndarray:
    """A step's reply, padded to the reference's 25 values per step (world/draft_exchange.py)."""
    body = np.zeros(REPLY_VALUES, dtype=np.int64)
    body[:6] = [DRAFT_REPLY, task_id, step, token, _float_bits(confidence), n_fed]
    return body


def decode_reply(body: np.ndarray) -> tuple[int, int, int, float, int]:
    if body.size != REPLY_VALUES or int(body[0]) != DRAFT_REPLY:
        raise ProtocolError(f"malformed draft reply of {body.size} values")
    _, task_id, step, token, bits, n_fed = (int(v) for v in body[:6])
    return task_id, step, token, _bits_float(bits), n_fed


class RemoteDraftTask:
    """One draft request in progress on the draft rank; ``step()`` waits for the next step's reply."""

    def __init__(self, drafter: RemoteDrafter, request: RequestDraft, task_id: int,
                 proposals: list[int] | TreeProposal | None) -> None:
        self.drafter = drafter
        self.request = request
        self.task_id = task_id
        self.proposals = proposals
        self.tree = proposals if isinstance(proposals, TreeProposal) else None  # PipeInfer's token trees
        self.tokens: list[int] = []
        self.steps = 0
        self.done = request.n_tokens <= 0

    def step(self) -> int:
        """The next step's reply (the first step sends the request); returns how many tokens it processed."""
        drafter = self.drafter
        if self.steps == 0:
            drafter.send_request(self)
        token, confidence, n_fed = drafter.await_reply(self.task_id, self.steps)
        self.steps += 1
        # what the draft holds for sure: the context, and the tokens it was fed after it (as the simulator's)
        drafter.known = list(self.request.context) + self.tokens[:self.steps - 1]
        if self.tree is not None:  # a token tree: its draft steps, then the whole tree
            if self.steps >= self.tree.n_steps:
                self.tokens, self.done = self.tree.tokens, True
            return n_fed
        if self.proposals is not None:  # the oracle's token; past its last one, its stop below the cut-off
            if len(self.tokens) >= len(self.proposals):
                self.done = True
                return n_fed
            token = self.proposals[len(self.tokens)]
        elif confidence < self.request.min_confidence or math.isnan(confidence):
            self.done = True  # not confident enough: stop before this token
            return n_fed
        self.tokens.append(token)
        self.done = len(self.tokens) >= self.request.n_tokens
        return n_fed


class RemoteDrafter:
    """The head's side: starts draft tasks on the draft rank (``Drafter``'s interface)."""

    def __init__(self, messenger: Messenger, draft_rank: int, oracle: OracleDraft | None, deadline: float) -> None:
        self.messenger = messenger
        self.draft_rank = draft_rank
        self.oracle = oracle
        self.deadline = deadline
        self.known: list[int] = []  # tokens the draft rank surely holds (it may hold more: steps it ran ahead)
        self._next_id = 0
        self._replies: dict[tuple[int, int], tuple[int, float, int]] = {}  # (task, step) -> reply, arrived early

    def arrived(self, body) -> None:
        """A reply the head's loop received while it did other work (the draft node runs ahead)."""
        task_id, step, token, confidence, n_fed = decode_reply(body)
        if task_id == self._next_id:  # replies of abandoned drafts are dropped
            self._replies[(task_id, step)] = (token, confidence, n_fed)

    def begin(self, request: RequestDraft) -> RemoteDraftTask:
        proposals = None
        if self.oracle is not None:
            proposal = self.oracle.propose_request(request)
            proposals = proposal if request.n_parallel > 1 else proposal.tokens
        self._next_id += 1
        self._replies.clear()  # early replies of an abandoned draft
        return RemoteDraftTask(self, request, self._next_id, proposals)

    def send_request(self, task: RemoteDraftTask) -> None:
        context = list(task.request.context)
        keep = min(common_prefix_len(self.known, context), len(context) - 1)
        min_confidence = None if task.proposals is not None else task.request.min_confidence
        body = encode_request(task.task_id, keep, task.request.n_tokens, min_confidence, context[keep:])
        self.messenger.send(self.draft_rank, TAG_DRAFT, body)

    def await_reply(self, task_id: int, step: int) -> tuple[int, float, int]:
        """(token, confidence, tokens processed) of step ``step`` of task ``task_id``; older replies are dropped."""
        early = self._replies.pop((task_id, step), None)
        if early is not None:
            return early
        while True:
            envelope = self.messenger.wait_tag(TAG_DRAFT, self.deadline,
                                               f"draft step {step} from rank {self.draft_rank}")
            got_id, got_step, token, confidence, n_fed = decode_reply(envelope.body)
            if got_id == task_id and got_step == step:
                return token, confidence, n_fed
            if got_id > task_id or (got_id == task_id and got_step > step):
                raise ProtocolError(f"draft reply for task {got_id} step {got_step} while awaiting task {task_id} "
                                    f"step {step}")

    def close(self) -> None:
        """End the draft rank's loop."""
        self.messenger.send(self.draft_rank, TAG_DRAFT, encode_request(STOP_TASK, 0, 0, None, []))


class DraftServer:
    """The draft rank's loop for one generation: serve draft requests until the head's stop."""

    def __init__(self, runner: DraftRunner, messenger: Messenger, head: int, clock: Clock, records: list[Record],
                 node_name: str, deadline: float, fault_rank: int | None = None) -> None:
        self.runner = runner
        self.fault_rank = fault_rank  # executor.fault_rank: this rank fails at its first draft request
        self.messenger = messenger
        self.head = head
        self.clock = clock
        self.records = records
        self.name = node_name
        self.deadline = deadline

    def run(self) -> None:
        messenger = self.messenger
        pending: tuple[int, int, int, float | None, list[int]] | None = None
        while True:
            if pending is None:
                pending = decode_request(messenger.wait_tag(TAG_DRAFT, self.deadline, "a draft request").body)
            task_id, keep, n_tokens, min_confidence, tokens = pending
            pending = None
            if task_id == STOP_TASK:
                return
            if self.fault_rank is not None:
                raise InjectedFault(f"injected fault at draft request {task_id} (executor.fault_rank={self.fault_rank})")
            pending = self._draft(task_id, keep, n_tokens, min_confidence, tokens)

    def _draft(self, task_id: int, keep: int, n_tokens: int, min_confidence: float | None, tokens: list[int]):
        """Compute a draft's steps; returns the request that arrived meanwhile (or None)."""
        runner, messenger = self.runner, self.messenger
        feed = runner.rewind(list(runner.cached[:keep]) + tokens)
        for step in range(n_tokens):
            start = self.clock.now()
            token, confidence = runner.feed(feed)
            self.records.append(Record("compute", start, self.clock.now(), self.name, -1, len(feed), what="draft"))
            messenger.send(self.head, TAG_DRAFT, encode_reply(task_id, step, token, confidence, len(feed)))
            if min_confidence is not None and (confidence < min_confidence or math.isnan(confidence)):
                return None
            feed = [token]
            messenger.poll()
            envelope = messenger.take_tag(TAG_DRAFT)
            if envelope is not None:  # the head's next request: this draft is abandoned
                return decode_request(envelope.body)
        return None
