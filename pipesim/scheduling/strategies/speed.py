"""SPEED (Hooper et al.): speculative pipelined execution with early-layer predictions.

When a run passes the exit layer, the hidden state there predicts the next token (an early exit); that token
enters the pipeline at once as a one-token speculative run chained on the run that predicted it, before the
current token has left the pipeline. When the final prediction arrives it verifies the early one; a mismatch
invalidates (and cancels) every later run of the chain, exactly as in PipeInfer, whose chain, KV partition and
verification machinery this strategy reuses. There is no separate draft model.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..actions import Action
from .pipeinfer import DEFAULT_PARTITIONS, PipeInferStrategy


class SpeedStrategy(PipeInferStrategy):
    """Early-exit speculation: each run's prediction at ``exit_layer`` launches the next token speculatively.

    Every launched run carries ``meta["exit_layer"]``; engines report the early prediction with
    ``on_early_exit``. ``max_runs_in_flight`` bounds the chain (None: bounded by the partition pool).
    """

    name = "speed"

    def __init__(self, prompt: Sequence[int], n_generate: int, exit_layer: int = 8,
                 max_runs_in_flight: int | None = None, n_partitions: int = DEFAULT_PARTITIONS,
                 early_cancellation: bool = True, stop_tokens: Sequence[int] = ()) -> None:
        super().__init__(prompt, n_generate, micro_batch=1, min_confidence=0.0,
                         max_runs_in_flight=max_runs_in_flight, n_partitions=n_partitions,
                         early_cancellation=early_cancellation, stop_tokens=stop_tokens, variant="continuous")
        if exit_layer < 0:
            raise ValueError(f"exit_layer must be >= 0, got {exit_layer}")
        self.exit_layer = exit_layer

    def _launch(self, *args, **kwargs):
        launch = super()._launch(*args, **kwargs)
        launch.run.meta["exit_layer"] = self.exit_layer
        return launch

    def _speculate(self) -> list[Action]:
        return []  # speculation comes from early exits, not from a draft model

    def on_early_exit(self, run_id: int, token: int) -> list[Action]:
        """The early-exit prediction of the token after run ``run_id``'s last token."""
        if self.done or not self._chain or self._chain[-1].run.run_id != run_id:
            return []  # the run was invalidated, or a later run already continues the chain
        if self.max_runs_in_flight is not None and len(self._chain) >= self.max_runs_in_flight:
            return []
        if not self._fits(1):
            return []
        return self._launch_speculative([token])
