"""Strategies as state machines: events in (predictions arrived, draft ready), actions out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Strategy
from .iterative import IterativeStrategy
from .pipeinfer import PipeInferStrategy
from .speculative import SpeculativeStrategy
from .speed import SpeedStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    "iterative": IterativeStrategy,
    "speculative": SpeculativeStrategy,
    "pipeinfer": PipeInferStrategy,
    "speed": SpeedStrategy,
}


def make_strategy(name: str, prompt: Sequence[int], n_generate: int, params: dict[str, Any] | None = None,
                  stop_tokens: Sequence[int] = ()) -> Strategy:
    """Build a strategy by name with its parameters (unknown names raise a ValueError listing the known ones)."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})") from None
    return cls(prompt, n_generate, stop_tokens=stop_tokens, **(params or {}))


__all__ = ["STRATEGIES", "Strategy", "IterativeStrategy", "SpeculativeStrategy", "PipeInferStrategy", "SpeedStrategy",
           "make_strategy"]
