"""Plain pipeline-parallel decoding: one token at a time through all stages."""

from __future__ import annotations

from collections.abc import Sequence

from ..actions import Action
from .base import Strategy


class IterativeStrategy(Strategy):
    """Prefill the prompt, then one single-token run per generated token."""

    name = "iterative"

    def start(self) -> list[Action]:
        return [self._launch_prefill()]

    def on_logits(self, run_id: int, predictions: Sequence[int]) -> list[Action]:
        if self.done:
            return []
        actions = self._commit([predictions[-1]])
        if not self.done:
            actions.append(self._launch([self.sequence[-1]], len(self.sequence) - 1))
        return actions
