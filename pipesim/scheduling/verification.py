"""Greedy verification of drafted tokens against the target's predictions (linear drafts and token trees)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


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
                root_prediction: int = -1, start: int = -1) -> TreeVerification:
    """Verify a token tree greedily.

    The tree's nodes are ``tokens[i]`` with parent index ``parents[i]`` (-1: child of the context's last token);
    parents come before children. ``predictions[i]`` is the target's greedy token after node i's path and
    ``root_prediction`` the one after the context. Starting at ``start`` (-1: the context's last token; else a node
    whose path is already committed, so the walk begins with ``predictions[start]``), follow the child equal to the
    prediction; the longest such path is accepted, and the prediction after its end is the next token.

    This is the walk of PipeInfer's ``speculative.cpp`` (``main``, the verification loop): at each depth the
    target's greedy token is compared with the token of every still-active branch, the branches that disagree are
    dropped, and the branch kept (``s_keep``) is one holding the longest agreeing path (a node's children hold
    distinct tokens, so at most one child agrees).
    """
    if not (len(tokens) == len(parents) == len(predictions)):
        raise ValueError("tokens, parents and predictions must have equal lengths")
    if not -1 <= start < len(tokens):
        raise ValueError(f"start {start} is not a node of a {len(tokens)}-node tree (or -1)")
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"parent {parent} of node {i} must come before it")
        children.setdefault(parent, []).append(i)
    accepted: list[int] = []
    path: list[int] = []
    node = start
    predicted = root_prediction if start < 0 else predictions[start]
    checked = 0
    while True:
        kids = children.get(node, [])
        checked += 1 if kids else 0
        match = next((k for k in kids if tokens[k] == predicted), None)
        if match is None:
            return TreeVerification(accepted, predicted, checked, path, node, not kids)
        accepted.append(tokens[match])
        path.append(match)
        node, predicted = match, predictions[match]


@dataclass(frozen=True)
class TreeVerification(Verification):
    """A tree's verification, with the accepted nodes (``path``), the node it ended at (``end``: the last accepted
    node, or the start) and whether that node is a leaf (the next token is then a bonus, not a correction)."""

    path: list[int] = field(default_factory=list)
    end: int = -1
    at_leaf: bool = False


class TokenTree(tuple):
    """A drafted token tree: the tuple of its nodes' tokens, parents before children, with ``parents[i]`` (-1: a
    child of the context's last token) and ``branches[i]`` (the branches whose path holds node i, branch 0 first;
    in PipeInfer each branch is a sequence id of the run's partition). Branch 0's path comes first, so the tree's
    first tokens are the main branch, the one the next drafted tokens continue (as a linear draft's would)."""

    parents: tuple[int, ...]
    branches: tuple[tuple[int, ...], ...]

    def __new__(cls, tokens: Sequence[int], parents: Sequence[int], branches: Sequence[Sequence[int]]) -> TokenTree:
        tree = super().__new__(cls, tokens)
        if not (len(tree) == len(parents) == len(branches)):
            raise ValueError("a token tree needs one parent and one branch set per node")
        tree.parents = tuple(parents)
        tree.branches = tuple(tuple(b) for b in branches)
        return tree

    def __reduce__(self):  # pickling keeps the structure (a plain tuple subclass would lose it)
        return (TokenTree, (tuple(self), self.parents, self.branches))

    @property
    def n_branches(self) -> int:
        return 1 + max((b for bs in self.branches for b in bs), default=0)

    def depth(self, node: int) -> int:
        """Steps below the context: 0 for a child of the context's last token."""
        depth = 0
        while self.parents[node] >= 0:
            node = self.parents[node]
            depth += 1
        return depth

    def path(self, branch: int = 0) -> list[int]:
        """The nodes of ``branch``'s path, root first."""
        return [i for i, bs in enumerate(self.branches) if branch in bs]
