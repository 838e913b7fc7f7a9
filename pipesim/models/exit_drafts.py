"""Truncated early-exit drafts: the first ``k`` layers of a model, an exit adapter and the model's own head.

A draft named ``MODEL-exitK`` (e.g. ``smollm2-exit10``) is a separate draft model made of the target's own
weights: its embedding, blocks ``0..k-1``, the exit adapter trained for the state after ``k`` layers (SPEED's,
``pipesim models train-exit``; the ones in ``pipesim/data/exit_adapters`` ship) and the shared final norm and
output head. It has its own KV cache of ``k`` layers and runs as any other draft; nothing but the adapter
(about 0.7 MB) ships. This module only names and finds them (no torch): the executor builds the stage.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["ExitDraftName", "parse_exit_draft", "shipped_exit_adapters"]

_SUFFIX = re.compile(r"^(?P<base>.+)-exit(?P<layers>\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class ExitDraftName:
    """``base`` model text and ``layers`` kept (the exit after ``layers`` decoder layers)."""

    base: str
    layers: int


def parse_exit_draft(text: str) -> ExitDraftName | None:
    """``MODEL-exitK`` -> (MODEL, K); None for any other model text."""
    match = _SUFFIX.match(text.strip())
    if match is None:
        return None
    return ExitDraftName(match.group("base"), int(match.group("layers")))


def shipped_exit_adapters(model: str = "smollm2") -> dict[int, Path]:
    """The exit adapters that ship for ``model``: exit layer (layers kept) -> file (empty if none ship)."""
    folder = Path(str(resources.files("pipesim"))) / "data" / "exit_adapters"
    try:
        table = json.loads((folder / "acceptance.json").read_text())
    except (OSError, ValueError):
        return {}
    layers = table.get(model, {}).get("layers", {})
    return {int(k): folder / entry["file"] for k, entry in layers.items()}
