"""Greedy verification of drafted tokens against the target's predictions (linear drafts and token trees)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Verification:
    """Outcome of verifying a draft: the drafted tokens kept and the target's own next token."""

    accepted: list[int]
    next_token: int
    n_checked: int  # drafted tokens compared against a target prediction

    @property
    def n_accepted(self) -> int:
        return len(self.accepted)

    @property
    def emitted(self) -> list[int]:
        return [*self.accepted, self.next_token]


def verify_linear(draft: Sequence[int], predictions: Sequence[int]) -> Verification:
    """Verify a linear draft.

    ``predictions[i]`` is the target's greedy token after the context plus ``draft[:i]``, so there is one
    more prediction than drafted tokens. Tokens are accepted while they equal the prediction; the target's
    prediction after the last accepted token is the correction (or the bonus when all are accepted).
    """
    if len(predictions) != len(draft) + 1:
        raise ValueError(f"need len(draft)+1 predictions, got {len(predictions)} for {len(draft)} drafted tokens")
    accepted: list[int] = []
    for token, predicted in zip(draft, predictions, strict=False):
        if token != predicted:
            return Verification(accepted, predicted, len(accepted) + 1)
        accepted.append(token)
    return Verification(accepted, predictions[len(draft)], len(accepted))


def verify_tree(tokens: Sequence[int], parents: Sequence[int], predictions: Sequence[int],
                root_prediction: int) -> Verification:
    """Verify a token tree greedily.

    The tree's nodes are ``tokens[i]`` with parent index ``parents[i]`` (-1: child of the context's last token);
    parents come before children. ``predictions[i]`` is the target's greedy token after node i's path and
    ``root_prediction`` the one after the context. Starting at the root, follow the child equal to the
    prediction; the longest such path is accepted, and the prediction after its end is the next token.
    """
    if not (len(tokens) == len(parents) == len(predictions)):
        raise ValueError("tokens, parents and predictions must have equal lengths")
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        if parent >= i:
            raise ValueError(f"parent {parent} of node {i} must come before it")
        children.setdefault(parent, []).append(i)
    accepted: list[int] = []
    node, predicted, checked = -1, root_prediction, 0
    while True:
        kids = children.get(node, [])
        checked += 1 if kids else 0
        match = next((k for k in kids if tokens[k] == predicted), None)
        if match is None:
            return Verification(accepted, predicted, checked)
        accepted.append(tokens[match])
        node, predicted = match, predictions[match]
