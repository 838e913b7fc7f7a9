"""Synchronous speculative inference: draft γ tokens, verify them in one target run, repeat."""

from __future__ import annotations

from collections.abc import Sequence

from ..actions import Action, RequestDraft
from ..runs import CANONICAL_SEQ, KVOp
from ..verification import verify_linear
from .base import Strategy


class SpeculativeStrategy(Strategy):
    """Draft ``gamma`` tokens with the draft model, verify them in one run of the target, repeat.

    Each verification run holds the last committed token followed by the drafted tokens, so it yields
    ``gamma + 1`` predictions; rejected positions are removed from the KV cache before the next run.
    """

    name = "speculative"

    def __init__(self, prompt: Sequence[int], n_generate: int, gamma: int = 4, min_confidence: float = 0.0,
                 stop_tokens: Sequence[int] = ()) -> None:
        super().__init__(prompt, n_generate, stop_tokens)
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        self.gamma = gamma
        self.min_confidence = min_confidence
        self._draft: list[int] = []
        self._verify_run: int | None = None

    def start(self) -> list[Action]:
        return [self._launch_prefill()]

    def _request_draft(self) -> RequestDraft:
        return RequestDraft(self._new_request_id(), tuple(self.sequence), self.gamma, len(self.sequence),
                            self.min_confidence)

    def on_draft(self, request_id: int, tokens: Sequence[int]) -> list[Action]:
        if self.done:
            return []
        self._draft = list(tokens[: self.gamma])
        launch = self._launch([self.sequence[-1], *self._draft], len(self.sequence) - 1,
                              speculative=bool(self._draft), kind="verify")
        self._verify_run = launch.run.run_id
        return [launch]

    def on_logits(self, run_id: int, predictions: Sequence[int]) -> list[Action]:
        if self.done:
            return []
        if self._verify_run is None:  # the prefill
            actions = self._commit([predictions[-1]])
        else:
            base = len(self.sequence)  # position of the first drafted token
            result = verify_linear(self._draft, predictions)
            if result.n_accepted < len(self._draft):
                self._queue_kv(KVOp("rm", CANONICAL_SEQ, p0=base + result.n_accepted))
            actions = self._commit(result.emitted, result.n_checked, result.n_accepted)
        if not self.done:
            actions.append(self._request_draft())
        return actions
