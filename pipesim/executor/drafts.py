"""Drafts on the head: an oracle with a chosen acceptance rate, and a real second model.

A draft runs one forward step at a time (so the head can answer returned predictions between steps). What a
step costs comes from a *runner*: a real model with its own KV cache (``torch_backend.ModelRunner``), a sleep
for the roofline cost of the scenario's draft model (``EmulatedRunner``), or nothing (``FreeRunner``). The
oracle proposes the target's own greedy token at a position with the acceptance model's probability while its
context is the target's sequence, otherwise a different one (``pipesim.world.acceptance.OracleDraft``, decided per
position from the seed; with a confidence model it stops at a token below the request's cut-off, after the step
that drafted it), and uses its runner only for the cost; the model draft proposes its runner's greedy tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

from ..scheduling import RequestDraft
from ..scheduling.prefix import common_prefix_len
from ..world.acceptance import OracleDraft, Proposal, TreeProposal
from ..world.costs import NodeProfile
from .emulation import sleep_until


class DraftRunner(Protocol):
    """Runs draft-model steps, keeping what it has processed cached."""

    def rewind(self, context: Sequence[int]) -> list[int]:
        """Drop cached tokens not in ``context``; returns the tokens of ``context`` still to process (>= 1)."""

    def feed(self, tokens: Sequence[int]) -> tuple[int, float]:
        """Process ``tokens``; returns the greedy next token and its probability."""


class _PrefixCache:
    """The tokens a runner holds, and the rewind rule common to all runners."""

    def __init__(self) -> None:
        self.cached: list[int] = []

    def rewind(self, context: Sequence[int]) -> list[int]:
        keep = min(common_prefix_len(self.cached, list(context)), len(context) - 1)
        del self.cached[keep:]
        return list(context[keep:])


class FreeRunner(_PrefixCache):
    """A draft step that costs nothing."""

    def feed(self, tokens: Sequence[int]) -> tuple[int, float]:
        self.cached.extend(tokens)
        return 0, 1.0


class EmulatedRunner(_PrefixCache):
    """A draft step that sleeps for the modelled cost of the scenario's draft model on the head's node
    (``cost``: the simulator's roofline or calibrated cost model of the draft)."""

    def __init__(self, cost, node: NodeProfile, now: Callable[[], float]) -> None:
        super().__init__()
        self.cost = cost
        self.node = node
        self.now = now

    def feed(self, tokens: Sequence[int]) -> tuple[int, float]:
        seconds = self.cost.model_cost(self.node, len(tokens), len(self.cached))
        sleep_until(self.now() + seconds, self.now)
        self.cached.extend(tokens)
        return 0, 1.0


class ReferenceTokens:
    """The target's greedy continuation as the oracle sees it (``token``/``wrong`` like ``SyntheticTokens``)."""

    def __init__(self, sequence: Sequence[int], vocab_size: int) -> None:
        self.sequence = list(sequence)
        self.vocab_size = vocab_size

    def token(self, position: int) -> int:
        return self.sequence[position] if position < len(self.sequence) else 0

    def wrong(self, position: int) -> int:
        return (self.token(position) + 1) % self.vocab_size


class DraftTask:
    """One draft request in progress: ``step()`` runs one draft forward (the first processes the context)."""

    def __init__(self, request: RequestDraft, runner: DraftRunner, proposal: Proposal | TreeProposal | None) -> None:
        self.request = request
        self.runner = runner
        self.proposal = proposal
        self.tree = proposal if isinstance(proposal, TreeProposal) else None  # a token tree (PipeInfer)
        self.steps = 0
        self.tokens: list[int] = []
        self.pending = runner.rewind(request.context)
        self.done = request.n_tokens <= 0

    def step(self) -> int:
        """Run one draft forward; returns how many tokens it processed."""
        fed = self.pending
        token, confidence = self.runner.feed(fed)
        if self.tree is not None:  # its draft steps (one token each fed back: branch 0's), then the whole tree
            self.steps += 1
            main = self.tree.tokens[:len(self.tree.tokens.path(0))]
            self.pending = [main[self.steps - 1]] if self.steps <= len(main) else []
            if self.steps >= self.tree.n_steps or not self.pending:
                self.tokens, self.done = self.tree.tokens, True
            return len(fed)
        if self.proposal is not None:  # the oracle's token; past its last one, its stop below the cut-off
            if len(self.tokens) >= len(self.proposal.tokens):
                self.done = True
                return len(fed)
            token = self.proposal.tokens[len(self.tokens)]
        elif confidence < self.request.min_confidence or math.isnan(confidence):
            self.done = True  # not confident enough: stop before this token
            return len(fed)
        self.tokens.append(token)
        self.pending = [token]
        self.done = len(self.tokens) >= self.request.n_tokens
        return len(fed)


class Drafter:
    """Starts draft tasks: oracle proposals (with ``oracle``) or the runner's own greedy tokens."""

    def __init__(self, runner: DraftRunner, oracle: OracleDraft | None = None) -> None:
        self.runner = runner
        self.oracle = oracle

    def begin(self, request: RequestDraft) -> DraftTask:
        proposal = None
        if self.oracle is not None:
            proposal = self.oracle.propose_request(request)
        return DraftTask(request, self.runner, proposal)

    def close(self) -> None:
        """Nothing to end: this draft runs on the head (``remote_draft.RemoteDrafter`` ends its rank's loop)."""
