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

Token trees (``OracleDraft.propose_tree``, PipeInfer's ``n_parallel`` and ``p_split``): besides its top candidate a
branch has alternatives whose probabilities share what the top one leaves (stick-breaking with
``ConfidenceModel.second``); an alternative above the split threshold starts a new branch. The assumption: the
draft is calibrated in its alternatives, so when the top candidate of a branch on the target's sequence is wrong,
the target's token is alternative k with probability ``p_k / (1 - p_0)`` (and none with the rest); when the top
candidate is right no alternative is (a node's children hold distinct tokens: at most one agrees with the target).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..scheduling.actions import RequestDraft
from ..scheduling.verification import TokenTree

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
    second: tuple[float, float] = (1.0, 2.0)  # trees: each alternative's share of the probability left, Beta(a, b)


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


@dataclass(frozen=True)
class TreeProposal:
    """What the oracle drafts as a token tree: the tree (``TokenTree``, branch 0's path first) with each node's draft
    probability, the draft forward steps it took (one per step in which some branch sampled), and the splits (each
    a ``seq_rm`` + ``seq_cp`` on the draft's own KV cache in ``speculative.cpp``)."""

    tokens: TokenTree
    confidences: list[float]
    n_steps: int
    n_splits: int = 0
    stopped: bool = False  # every branch stopped below the cut-off (none ran into the token budget)


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

    def propose_request(self, request: RequestDraft) -> Proposal | TreeProposal:
        """The answer to a draft request: a linear proposal, or a tree when it asks for ``n_parallel > 1``."""
        if request.n_parallel > 1:
            return self.propose_tree(request.context, request.n_tokens, request.committed_len,
                                     request.min_confidence, request.n_parallel, request.split_confidence)
        return self.propose(request.context, request.n_tokens, request.committed_len, request.min_confidence)

    def propose_tree(self, context: Sequence[int], n_tokens: int, committed_len: int, min_confidence: float = 0.0,
                     n_parallel: int = 1, split_confidence: float = 1.0) -> TreeProposal:
        """Draft a token tree as ``speculative.cpp``'s ``start_async_spec_run`` does (its tree-based sampling loop).

        Drafting starts with branch 0. At each step every drafting branch samples; it stops when its top
        probability is below ``min_confidence`` (``p_accept + p_adjust``); while fewer than ``n_parallel``
        branches exist, each alternative candidate k >= 1 above ``split_confidence`` (``p_split + p_adjust``), in
        order, splits off a new branch that copies the parent's path and takes candidate k. A branch stops once the
        tree holds more than ``n_tokens`` nodes (``batch_tgt.n_tokens > n_draft``), and drafting ends after that
        step. With ``n_parallel=1`` the tree is a chain and equals ``propose``'s tokens, probabilities and steps.
        Right and wrong follow the module's tree assumption; branch 0 draws from the same streams as ``propose``,
        the other branches from streams of their own per (position, branch): seeded and deterministic.
        """
        tokens, acceptance = self.tokens, self.acceptance
        start = len(context)
        on_target0 = on_target(tokens, context, committed_len)
        node_tokens: list[int] = []
        node_parents: list[int] = []
        node_conf: list[float] = []
        node_branches: list[list[int]] = []
        paths: list[list[int]] = [[]]  # each branch's nodes
        right_path = [on_target0]  # each branch's path is the target's so far
        drafting = [True]
        n_steps = n_splits = 0
        stopped = False
        for i in range(n_tokens):
            position = start + i
            depth = position - committed_len
            added = sampled = 0
            n_existing = len(paths)  # branches split in this step sample from the next one on
            for s in range(n_existing):
                if not drafting[s]:
                    continue
                sampled += 1
                right = right_path[s] and acceptance.correct(position, depth)
                draws = None if s == 0 else self._tree_draws(position, s)
                confidence = (acceptance.draft_confidence(position, right) if s == 0
                              else self._branch_confidence(draws, right))
                if confidence < min_confidence or math.isnan(confidence):
                    drafting[s] = False
                    continue
                alternatives, u_pick = self._alternatives(position, confidence, draws)
                takers = [s]
                for p_k in alternatives:  # split while a candidate is above the threshold and room is left
                    if len(paths) < n_parallel and p_k > split_confidence:
                        paths.append(list(paths[s]))
                        right_path.append(right_path[s])
                        drafting.append(True)
                        for node in paths[s]:
                            node_branches[node].append(len(paths) - 1)
                        takers.append(len(paths) - 1)
                        n_splits += 1
                    else:
                        break
                winner = 0 if right else _right_alternative(confidence, alternatives, right_path[s], u_pick)
                parent = paths[s][-1] if paths[s] else -1
                for k, branch in enumerate(takers):
                    is_true = winner is not None and k == winner
                    if is_true:
                        token = tokens.token(position)
                    elif k == 0:
                        token = tokens.wrong(position)
                    else:  # a wrong alternative: distinct from the top candidate's wrong token and from the others
                        token = (tokens.token(position) + 1 + k) % tokens.vocab_size
                    node = len(node_tokens)
                    node_tokens.append(token)
                    node_parents.append(parent)
                    node_conf.append(confidence if k == 0 else alternatives[k - 1])
                    node_branches.append([branch])
                    paths[branch].append(node)
                    right_path[branch] = right_path[branch] and is_true
                    added += 1
                    if len(node_tokens) > n_tokens:
                        drafting[branch] = False
            if sampled:
                n_steps += 1
            if not added:
                stopped = True
                break
            if len(node_tokens) > n_tokens:
                break
        return TreeProposal(_main_first(node_tokens, node_parents, node_branches), _reorder(node_conf, paths[0]),
                            n_steps, n_splits, stopped)

    def _tree_draws(self, position: int, branch: int) -> np.random.Generator:
        """The draws of a branch > 0 at a position: a stream of their own (branch 0 uses ``propose``'s)."""
        return np.random.default_rng([self.acceptance.seed & 0xFFFFFFFF, 0x7EE, position, branch])

    def _branch_confidence(self, draws: np.random.Generator, right: bool) -> float:
        model = self.acceptance.confidence
        if model is None:
            return 1.0
        return float(draws.beta(*(model.right if right else model.wrong)))

    def _alternatives(self, position: int, top: float,
                      draws: np.random.Generator | None) -> tuple[list[float], float]:
        """Probabilities of candidates 1..7 (``speculative.cpp`` looks at 8: each takes a Beta(``second``) share of
        what the candidates before it leave, no more than the one before it), and the uniform that picks the right
        one (``_right_alternative``). No confidence model: no alternatives."""
        model = self.acceptance.confidence
        if model is None:
            return [], 1.0
        if draws is None:  # branch 0's alternatives: a stream apart from propose's, which it leaves untouched
            draws = np.random.default_rng([self.acceptance.seed & 0xFFFFFFFF, 0x7EE, position, 0])
        shares = draws.beta(*model.second, size=7)
        left, previous, out = 1.0 - top, top, []
        for share in shares:
            p = min(previous, left * float(share))
            out.append(p)
            left -= p
            previous = p
        return out, float(draws.random())


def _right_alternative(top: float, alternatives: list[float], on_path: bool, u: float) -> int | None:
    """Which candidate k >= 1 is the target's token when the top one (probability ``top``) is wrong, for a branch whose
    path is the target's: k with probability ``p_k / (1 - top)`` (uniform ``u``), None (no candidate) otherwise."""
    if not on_path or not alternatives or top >= 1.0:
        return None
    target, cumulative = u * (1.0 - top), 0.0
    for k, p in enumerate(alternatives, start=1):
        cumulative += p
        if target < cumulative:
            return k
    return None


def _main_first(tokens: list[int], parents: list[int], branches: list[list[int]]) -> TokenTree:
    """The tree with branch 0's path first, then the other nodes in drafting order (parents stay before children)."""
    main = [i for i in range(len(tokens)) if 0 in branches[i]]
    order = main + [i for i in range(len(tokens)) if 0 not in branches[i]]
    index = {old: new for new, old in enumerate(order)}
    return TokenTree([tokens[i] for i in order], [index[parents[i]] if parents[i] >= 0 else -1 for i in order],
                     [sorted(branches[i]) for i in order])


def _reorder(values: list[float], main: list[int]) -> list[float]:
    """``values`` per node in ``_main_first``'s order."""
    in_main = set(main)
    return [values[i] for i in main] + [v for i, v in enumerate(values) if i not in in_main]


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
