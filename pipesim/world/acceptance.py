"""Synthetic tokens and the acceptance model of the simulator.

The simulator needs no real model: the target's greedy continuation is a fixed synthetic token sequence
(``truth``), and the draft is an oracle that proposes the true token with a probability given by the acceptance
model, otherwise a wrong one. The decision for a position is fixed per seed, so the same draft asked again for the
same position answers the same, as a deterministic greedy draft model would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

_MIX = 0x9E3779B1


class SyntheticTokens:
    """The target's greedy continuation as a deterministic function of the position."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.seed = seed

    def token(self, position: int) -> int:
        return ((position + 1) * _MIX + self.seed * 7919) % self.vocab_size

    def wrong(self, position: int) -> int:
        """A token that differs from the true one at ``position``."""
        return (self.token(position) + 1) % self.vocab_size

    def predictions(self, positions: Sequence[int]) -> list[int]:
        """Target predictions for tokens at ``positions``: the true token of the next position."""
        token = self.token
        return [token(p + 1) for p in positions]


class AcceptanceModel:
    """Whether the draft's proposal for a position is right: i.i.d. α, α by depth, or a replayed sequence."""

    def __init__(self, kind: str = "iid", alpha: float = 0.7, alphas: Sequence[float] = (),
                 sequence: Sequence[int] = (), prompt_len: int = 0, seed: int = 0) -> None:
        if kind not in ("iid", "positional", "replay"):
            raise ValueError(f"unknown acceptance model {kind!r} (iid, positional, replay)")
        self.kind = kind
        self.alpha = alpha
        self.alphas = list(alphas)
        self.sequence = list(sequence)
        self.prompt_len = prompt_len
        self._rng = np.random.default_rng(seed)
        self._uniform = np.empty(0)

    def uniform(self, position: int) -> float:
        """The seeded uniform draw of a position (the same for every caller and every run)."""
        return self._u(position)

    def _u(self, position: int) -> float:
        if position >= len(self._uniform):
            extra = max(4096, position + 1 - len(self._uniform))
            self._uniform = np.concatenate([self._uniform, self._rng.random(extra)])
        return float(self._uniform[position])

    def correct(self, position: int, depth: int) -> bool:
        """Is the draft right at ``position``, ``depth`` tokens ahead of the committed sequence (0 = next)?"""
        if self.kind == "replay":
            index = position - self.prompt_len
            if not self.sequence or index < 0:
                return False
            return bool(self.sequence[index % len(self.sequence)])
        alpha = self.alpha if self.kind == "iid" else self.alphas[min(depth, len(self.alphas) - 1)]
        return self._u(position) < alpha


class OracleDraft:
    """A draft that proposes the target's own token with the acceptance model's probability."""

    def __init__(self, tokens: SyntheticTokens, acceptance: AcceptanceModel) -> None:
        self.tokens = tokens
        self.acceptance = acceptance

    def propose(self, context_len: int, n_tokens: int, committed_len: int) -> list[int]:
        proposals = []
        for i in range(n_tokens):
            position = context_len + i
            right = self.acceptance.correct(position, position - committed_len)
            proposals.append(self.tokens.token(position) if right else self.tokens.wrong(position))
        return proposals


def level_predictor(tokens, uniform: Callable[[int], float], accuracy: float) -> Callable[[Sequence[int]], list[int]]:
    """A draft model of a PipeSpec chain as an oracle: its prediction after position p is the target's token where
    the position's uniform is below the model's ``accuracy``, else the same wrong token for every wrong model (the
    models are coupled: a more accurate model is right wherever a less accurate one is, as related models tend
    to be). ``tokens``: ``SyntheticTokens`` or the executor's reference tokens."""

    def predict(positions: Sequence[int]) -> list[int]:
        return [tokens.token(p + 1) if accuracy >= 1.0 or uniform(p + 1) < accuracy else tokens.wrong(p + 1)
                for p in positions]

    return predict
