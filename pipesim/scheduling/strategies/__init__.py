"""Strategies as state machines: events in (predictions arrived, draft ready, level message), actions out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Strategy
from .iterative import IterativeStrategy
from .pipeinfer import PipeInferStrategy, resolve_switches
from .pipespec import LockstepLevel, PipeSpecLevel, make_level, make_pipespec_chain
from .speculative import SpeculativeStrategy
from .speed import SpeedStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    "iterative": IterativeStrategy,
    "speculative": SpeculativeStrategy,
    "pipeinfer": PipeInferStrategy,
    "speed": SpeedStrategy,
    "pipespec": PipeSpecLevel,
    "pipespec-sync": LockstepLevel,
}


def _lookup(name: str) -> type[Strategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})") from None


def make_strategies(name: str, prompt: Sequence[int], n_generate: int, params: dict[str, Any] | None = None,
                    stop_tokens: Sequence[int] = (), n_levels: int = 1, level: int | None = None,
                    kv_capacity: int | None = None) -> list[Strategy]:
    """One strategy per pipeline: a chain's ``n_levels`` levels (drafts first; ``level`` given: that level alone,
    with run ids unique across the chain), or the single strategy of a one-model strategy; ``kv_capacity``: the
    cells of every stage's KV cache, for back-pressure."""
    strategies = _make(name, prompt, n_generate, params, stop_tokens, n_levels, level)
    for strategy in strategies:
        strategy.kv_capacity = kv_capacity
    return strategies


def _make(name, prompt, n_generate, params, stop_tokens, n_levels, level) -> list[Strategy]:
    cls = _lookup(name)
    params = dict(params or {})
    if cls.expects_messages:
        params["synchronous"] = cls is LockstepLevel
        if level is not None:
            return [make_level(level, n_levels, prompt, n_generate, stop_tokens=stop_tokens, **params)]
        return list(make_pipespec_chain(prompt, n_generate, n_levels, stop_tokens=stop_tokens, **params))
    if n_levels != 1 or level not in (None, 0):
        raise ValueError(f"strategy {name!r} runs one model, not a chain of {n_levels}")
    return [cls(prompt, n_generate, stop_tokens=stop_tokens, **params)]


def full_cancelled_traffic(name: str, params: dict[str, Any] | None = None) -> bool:
    """Whether a stage still sends a run it did not compute on as whole activations (and the last stage its full
    logits), as PipeInfer's reference code does; every other strategy sends a header at most."""
    if _lookup(name) is not PipeInferStrategy:
        return False
    params = params or {}
    return resolve_switches(params.get("variant", "reference"),
                            cancelled_traffic=params.get("cancelled_traffic"))["cancelled_traffic"] == "full"


def make_strategy(name: str, prompt: Sequence[int], n_generate: int, params: dict[str, Any] | None = None,
                  stop_tokens: Sequence[int] = ()) -> Strategy:
    """Build a one-model strategy by name with its parameters (unknown names raise a ValueError listing them)."""
    return make_strategies(name, prompt, n_generate, params, stop_tokens)[0]


__all__ = ["STRATEGIES", "Strategy", "IterativeStrategy", "SpeculativeStrategy", "PipeInferStrategy", "SpeedStrategy",
           "PipeSpecLevel", "LockstepLevel", "make_strategy", "make_strategies", "full_cancelled_traffic"]
