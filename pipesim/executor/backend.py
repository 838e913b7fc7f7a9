"""What a rank computes with: the interface shared by real (torch) and emulated (sleeping) stages."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from ..scheduling import KVOp
from .protocol import PredictionMessage, RunMessage


class StageBackend(Protocol):
    """One pipeline stage: its KV cache (if any) and its compute."""

    def apply_kv_ops(self, ops: Sequence[KVOp]) -> None:
        """Apply a run's KV operations, in order (before the run, even when it is skipped)."""

    def forward(self, msg: RunMessage, activations: np.ndarray | None,
                should_cancel: Callable[[], bool] | None = None,
                on_exit: Callable[[int, float], None] | None = None) -> np.ndarray | PredictionMessage | None:
        """Compute the run: activations for the next stage, predictions on the last, None when cancelled.

        SPEED: when the stage holds the run's ``exit_layer``, ``on_exit(token, seconds)`` is called right after
        that layer with the early prediction (-1: the head's oracle decides) and the seconds it took."""

    def kv_cells(self) -> int:
        """KV cells in use (0 without a cache)."""
