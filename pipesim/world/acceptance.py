"""Synthetic tokens and the acceptance model of the simulator (and of the executor's oracle draft).

The simulator needs no real model: the target's greedy continuation is a fixed synthetic token sequence
(``truth``), and the draft is an oracle that proposes the true token with a probability given by the acceptance
model, otherwise a wrong one. The decision for a position is fixed per seed, so the same draft asked again for the
same position answers the same, as a deterministic greedy draft model would.

Acceptance is judged **against the prefix**: the acceptance model says whether the draft, given the target's own
prefix, predicts the target's token at a position. A token drafted after a wrong token (a context that has left
the target's sequence) is never the target's token: the oracle proposes a wrong one, until it drafts again from the
corrected prefix. Models (``AcceptanceModel``; the README's "Acceptance models" gives the formulas):

- ``iid``: right with probability ``alpha`` at every position;
- ``positional``: right with probability ``alphas[d]`` at depth ``d`` ahead of the committed sequence;
- ``replay``: right where a recorded 1/0 sequence (per generated position) says so;
- ``markov``: a two-state Markov chain over the generated positions, ``P(right at t | right at t-1) =
  p_after_accept``, ``P(right at t | wrong at t-1) = p_after_reject``, the first generated position right with
  ``p_first`` (default: the chain's stationary rate).

With a ``ConfidenceModel`` the oracle also reports a draft probability per token, drawn from one Beta distribution
for right tokens and another for wrong ones, and stops drafting at the first token below the request's cut-off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

_MIX = 0x9E3779B1
ACCEPTANCE_MODELS = ("iid", "positional", "replay", "markov")


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


def markov_stationary(p_after_accept: float, p_after_reject: float) -> float:
    """The long-run rate of right positions of the two-state chain: ``p_ar / (1 - p_aa + p_ar)``."""
    denominator = 1.0 - p_after_accept + p_after_reject
    return 1.0 if denominator <= 0 else p_after_reject / denominator


@dataclass(frozen=True)
class ConfidenceModel:
    """The draft probability the oracle reports with each token: Beta(``right``) for a token that is the target's,
    Beta(``wrong``) for one that is not (each a pair ``(a, b)``; mean ``a / (a + b)``). Documented defaults: right
    tokens ~ Beta(8, 2) (mean 0.8), wrong ones ~ Beta(2, 5) (mean 0.29), so confidence predicts correctness."""

    right: tuple[float, float] = (8.0, 2.0)
    wrong: tuple[float, float] = (2.0, 5.0)


class AcceptanceModel:
    """Whether the draft's proposal for a position, from the target's own prefix, is right (see the module)."""

    def __init__(self, kind: str = "iid", alpha: float = 0.7, alphas: Sequence[float] = (),
                 sequence: Sequence[int] = (), prompt_len: int = 0, seed: int = 0,
                 p_after_accept: float | None = None, p_after_reject: float | None = None,
                 p_first: float | None = None, confidence: ConfidenceModel | None = None) -> None:
        if kind not in ACCEPTANCE_MODELS:
            raise ValueError(f"unknown acceptance model {kind!r} ({', '.join(ACCEPTANCE_MODELS)})")
        if kind == "markov" and (p_after_accept is None or p_after_reject is None):
            raise ValueError("acceptance model markov needs p_after_accept and p_after_reject")
        self.kind = kind
        self.alpha = alpha
        self.alphas = list(alphas)
        self.sequence = list(sequence)
        self.prompt_len = prompt_len
        self.p_after_accept = p_after_accept
        self.p_after_reject = p_after_reject
        self.p_first = p_first
        self.confidence = confidence
        self._rng = np.random.default_rng(seed)
        self._uniform = np.empty(0)
        self._states: list[bool] = []  # markov: right/wrong per generated position
        self.seed = seed
        self._conf_right = np.empty(0)
        self._conf_wrong = np.empty(0)

    def uniform(self, position: int) -> float:
        """The seeded uniform draw of a position (the same for every caller and every run)."""
        return self._u(position)

    def _u(self, position: int) -> float:
        if position >= len(self._uniform):
            extra = max(4096, position + 1 - len(self._uniform))
            self._uniform = np.concatenate([self._uniform, self._rng.random(extra)])
        return float(self._uniform[position])

    def correct(self, position: int, depth: int) -> bool:
        """Is the draft right at ``position`` given the target's prefix, ``depth`` tokens ahead of the committed
        sequence (0 = next)? (A caller whose context has left the target's sequence must not ask: it is wrong.)"""
        kind = self.kind
        if kind == "iid":
            return self._u(position) < self.alpha
        if kind == "markov":
            return self._markov(position)
        if kind == "replay":
            index = position - self.prompt_len
            if not self.sequence or index < 0:
                return False
            return bool(self.sequence[index % len(self.sequence)])
        return self._u(position) < self.alphas[min(depth, len(self.alphas) - 1)]

    def _markov(self, position: int) -> bool:
        index = position - self.prompt_len
        if index < 0:
            return self._u(position) < markov_stationary(self.p_after_accept, self.p_after_reject)
        states = self._states
        while len(states) <= index:
            if states:
                p = self.p_after_accept if states[-1] else self.p_after_reject
            else:
                p = markov_stationary(self.p_after_accept, self.p_after_reject) if self.p_first is None else self.p_first
            states.append(self._u(self.prompt_len + len(states)) < p)
        return states[index]

    def draft_confidence(self, position: int, right: bool) -> float:
        """The draft probability of the token the oracle drafts at ``position`` (1.0 without a confidence model)."""
        model = self.confidence
        if model is None:
            return 1.0
        if position >= len(self._conf_right):
            n = max(4096, 2 * position + 1)
            # streams of their own: the acceptance draws do not move, and a longer draw keeps the earlier values
            self._conf_right = np.random.default_rng([self.seed & 0xFFFFFFFF, 0xC0F1, 1]).beta(*model.right, size=n)
            self._conf_wrong = np.random.default_rng([self.seed & 0xFFFFFFFF, 0xC0F1, 0]).beta(*model.wrong, size=n)
        return float((self._conf_right if right else self._conf_wrong)[position])


@dataclass(frozen=True)
class Proposal:
    """What the oracle drafts for one request: its tokens with their draft probabilities, and whether it stopped at
    a token below the cut-off (that token was computed by one more draft step, then dropped)."""

    tokens: list[int]
    confidences: list[float]
    stopped: bool = False

    @property
    def n_steps(self) -> int:
        """Draft forward steps the proposal took."""
        return len(self.tokens) + self.stopped


def on_target(tokens, context: Sequence[int], start: int) -> bool:
    """Whether ``context[start:]`` equals the target's sequence at those positions (``tokens.token``)."""
    token = tokens.token
    return all(context[i] == token(i) for i in range(start, len(context)))


class OracleDraft:
    """A draft that proposes the target's own token with the acceptance model's probability, as long as its
    context is the target's sequence; after a wrong token (in the context or drafted) every token is wrong."""

    def __init__(self, tokens: SyntheticTokens, acceptance: AcceptanceModel) -> None:
        self.tokens = tokens
        self.acceptance = acceptance

    def propose(self, context: Sequence[int], n_tokens: int, committed_len: int,
                min_confidence: float = 0.0) -> Proposal:
        """Draft up to ``n_tokens`` after ``context`` (whose first ``committed_len`` tokens are committed, so the
        target's); with a confidence model, stop before the first token whose probability is below
        ``min_confidence``."""
        tokens, acceptance = self.tokens, self.acceptance
        diverged = not on_target(tokens, context, committed_len)
        proposed: list[int] = []
        confidences: list[float] = []
        start = len(context)
        for i in range(n_tokens):
            position = start + i
            right = not diverged and acceptance.correct(position, position - committed_len)
            confidence = acceptance.draft_confidence(position, right)
            if confidence < min_confidence or math.isnan(confidence):
                return Proposal(proposed, confidences, stopped=True)
            proposed.append(tokens.token(position) if right else tokens.wrong(position))
            confidences.append(confidence)
            diverged = not right
        return Proposal(proposed, confidences)


class LevelOracle:
    """A draft model of a PipeSpec chain as an oracle, judged against the prefix.

    Called with each run of its level (as its predictions are wanted); it remembers which token the level's cache
    holds at each position (the last run that carried it), and its prediction after position ``p`` is the target's
    token only where every cached token up to ``p`` is the target's and ``right(p + 1)`` holds; otherwise the
    wrong token. ``tokens``: ``SyntheticTokens`` or the executor's reference tokens."""

    def __init__(self, tokens, right: Callable[[int], bool]) -> None:
        self.tokens = tokens
        self.right = right
        self._off_target: set[int] = set()  # cached positions whose token is not the target's

    def __call__(self, run) -> list[int]:
        token, wrong, right, off = self.tokens.token, self.tokens.wrong, self.right, self._off_target
        for position, value in zip(run.positions, run.tokens, strict=True):
            if value == token(position):
                off.discard(position)
            else:
                off.add(position)
        first_off = min(off) if off else math.inf
        return [token(p + 1) if p < first_off and right(p + 1) else wrong(p + 1)
                for p in run.positions[run.output_from:]]


def level_predictor(tokens, acceptance: AcceptanceModel, accuracy: float,
                    top_accuracy: float | None = None) -> LevelOracle:
    """The oracle of one draft model of a chain, right (from the target's prefix) with probability ``accuracy``.

    i.i.d. (and positional) acceptance: right where the position's uniform is below ``accuracy`` (the models are
    coupled: a more accurate model is right wherever a less accurate one is, as related models tend to be). Markov
    and replay: the chain's most accurate draft (``top_accuracy``, default ``accuracy``) is right where the
    acceptance model says; a less accurate one only where it is and a second coupled uniform is below
    ``accuracy / top_accuracy``.
    """
    if acceptance.kind in ("iid", "positional"):
        if accuracy >= 1.0:
            return LevelOracle(tokens, lambda _position: True)
        uniform = acceptance.uniform
        return LevelOracle(tokens, lambda position: uniform(position) < accuracy)
    correct = acceptance.correct
    top = accuracy if top_accuracy is None else top_accuracy
    if accuracy >= top:
        return LevelOracle(tokens, lambda position: correct(position, 0))
    share = accuracy / top if top > 0 else 0.0
    second = AcceptanceModel("iid", share, seed=(acceptance.seed + 0x5EC0) & 0xFFFFFFFF)
    return LevelOracle(tokens, lambda position: correct(position, 0) and second.uniform(position) < share)
