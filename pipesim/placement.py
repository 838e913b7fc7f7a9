"""Placement of the target's layers on pipeline stages."""

from __future__ import annotations

from collections.abc import Sequence


def split_layers(n_layers: int, fractions: Sequence[float] | None, n_stages: int | None = None) -> list[tuple[int, int]]:
    """Layer ranges ``[start, end)`` per stage from fractions (normalised), each stage getting at least one layer.

    ``fractions=None`` splits evenly over ``n_stages``. Stage boundaries are the rounded cumulative fractions.
    """
    if fractions is None:
        if n_stages is None:
            raise ValueError("split_layers needs fractions or n_stages")
        fractions = [1.0] * n_stages
    n = len(fractions)
    if n < 1:
        raise ValueError("layer split needs at least one stage")
    if n > n_layers:
        raise ValueError(f"{n} stages is more than the model's {n_layers} layers")
    if any(f <= 0 for f in fractions):
        raise ValueError(f"layer split fractions must be > 0, got {list(fractions)}")
    total = float(sum(fractions))
    bounds = [0]
    cumulative = 0.0
    for i, fraction in enumerate(fractions[:-1]):
        cumulative += fraction
        boundary = round(cumulative / total * n_layers)
        boundary = max(boundary, bounds[-1] + 1)  # at least one layer in this stage
        boundary = min(boundary, n_layers - (n - 1 - i))  # leave one layer for each later stage
        bounds.append(boundary)
    bounds.append(n_layers)
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


def target_stages(n_layers: int, fractions: Sequence[float] | None,
                  n_nodes: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The target's pipeline over ``n_nodes`` nodes: the nodes that hold layers, in order, and their ranges.

    A ``0`` fraction is a node without target layers (the draft's own node, as PipeInfer's script runs it: 7
    target ranks and a draft rank); ``fractions=None`` spreads the layers over every node.
    """
    if fractions is None:
        return list(range(n_nodes)), split_layers(n_layers, None, n_nodes)
    if len(fractions) != n_nodes:
        raise ValueError(f"layer split has {len(fractions)} entries for {n_nodes} nodes")
    if any(f < 0 for f in fractions):
        raise ValueError(f"layer split fractions must be >= 0, got {list(fractions)}")
    nodes = [i for i, f in enumerate(fractions) if f > 0]
    if not nodes:
        raise ValueError(f"layer split {list(fractions)} gives no node any layer")
    return nodes, split_layers(n_layers, [fractions[i] for i in nodes])
