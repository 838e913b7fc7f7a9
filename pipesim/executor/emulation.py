"""Emulation on few cores: stages that sleep for their modelled cost, and links that delay messages.

Emulated compute sleeps for the simulator's modelled time of a run on the stage's node (the world's cost model:
the roofline, or the fitted costs of ``cluster.profile``; layer by layer, so a cancelled run is aborted at a layer boundary) and
answers with the synthetic target's greedy tokens, so outputs stay checkable. Link emulation delivers a message
no earlier than its modelled arrival: each direction of each link is a FIFO of latency + bytes/bandwidth, exactly
the simulator's ``Network``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ..scenario import Scenario
from ..trace import Record
from ..world.acceptance import SyntheticTokens
from ..world.build import build_world
from ..world.costs import NodeProfile
from .protocol import PredictionMessage, RunMessage, predictions_from_ids

SLEEP_SLICE = 0.05  # longest single sleep


def sleep_until(deadline: float, now: Callable[[], float]) -> None:
    """Sleep until ``now() >= deadline`` (absolute deadlines, so per-layer sleeps do not add up errors)."""
    while (remaining := deadline - now()) > 0:
        time.sleep(min(remaining, SLEEP_SLICE))


def charge_kv_transactions(msg: RunMessage, seconds_each: float, now: Callable[[], float], records: list,
                           where: str) -> None:
    """PipeInfer's reference KV bookkeeping, emulated: the stage spends ``msg.kv_transactions`` x ``seconds_each``
    (``cluster.kv_transaction_time``) before the run, as the simulator charges it, and records it as compute
    ``kv``. The operations themselves stay the compact ones of ``msg.kv_ops``; no per-transaction messages."""
    if not msg.kv_transactions or seconds_each <= 0:
        return
    start = now()
    sleep_until(start + msg.kv_transactions * seconds_each, now)
    records.append(Record("compute", start, now(), where, msg.run_id, msg.kv_transactions, what="kv"))


class LinkEmulator:
    """Modelled arrival of messages on the scenario's network (head-clock times)."""

    def __init__(self, scenario: Scenario, node_names: list[str]) -> None:
        self.network = build_world(scenario).network(measured_transport=False)
        if self.network.node_names != list(node_names):
            raise ValueError(f"link emulation for nodes {node_names} of a scenario with {self.network.node_names}")

    def arrival(self, src: int, dst: int, send_time: float, nbytes: float) -> tuple[float, float, float]:
        """(serialisation start, serialisation end, arrival) of a message sent at ``send_time``.

        Messages of one link direction must be given in the order they were sent (FIFO).
        """
        return self.network.link(src, dst).send(send_time, nbytes)


class EmulatedStage:
    """A stage (layers, and the output head on the last) whose compute is a modelled sleep."""

    def __init__(self, node: NodeProfile, cost, n_layers: int, is_last: bool,
                 tokens: SyntheticTokens, return_mode: str, top_k: int, now: Callable[[], float],
                 layer_start: int = 0) -> None:
        self.node = node
        self.layer_start = layer_start
        self.cost = cost
        self.n_layers = n_layers
        self.is_last = is_last
        self.tokens = tokens
        self.return_mode = return_mode
        self.top_k = top_k
        self.now = now
        self.d_model = cost.spec.d_model
        self.vocab_size = cost.spec.vocab_size

    def apply_kv_ops(self, ops) -> None:
        """Emulated stages hold no KV cache."""

    def kv_cells(self) -> int:
        return 0

    def forward(self, msg: RunMessage, activations: np.ndarray | None,
                should_cancel: Callable[[], bool] | None = None,
                on_exit: Callable[[int, float], None] | None = None) -> np.ndarray | PredictionMessage | None:
        """Sleep layer by layer; None when cancelled at a layer boundary, else activations or predictions.

        SPEED: after the run's exit layer (if here) it sleeps for the exit head on one token (as the simulator
        charges it) and calls ``on_exit(-1, seconds)``: the head's oracle decides the token."""
        n_outputs = msg.n_outputs if self.is_last else 0
        cost = self.cost.stage_cost(self.node, self.n_layers, msg.n_tokens, msg.positions[0], n_outputs)
        start = self.now()
        boundary = start + self.node.overhead_per_run
        exit_at = -1
        if on_exit is not None and msg.exit_layer is not None:
            exit_at = msg.exit_layer - self.layer_start
        extra = 0.0
        for j in range(self.n_layers):
            boundary += cost.per_layer
            sleep_until(boundary, self.now)
            if j == exit_at:
                extra = self.cost.output_head_time(self.node, 1)
                boundary += extra
                sleep_until(boundary, self.now)
                on_exit(-1, extra)
            if should_cancel is not None and should_cancel():
                return None
        sleep_until(start + cost.total - cost.dispatch + extra, self.now)  # the executor does its own dispatch
        if not self.is_last:
            return np.zeros((msg.n_tokens, self.d_model), dtype=np.float32)
        greedy = self.tokens.predictions(msg.positions[msg.output_from:])
        # a chain's draft model may have a smaller vocabulary than the synthetic target's tokens: its (oracle) head
        # replaces these predictions anyway; the message keeps the model's own size
        greedy = [token % self.vocab_size for token in greedy]
        return predictions_from_ids(msg.run_id, greedy, self.return_mode, self.vocab_size, self.top_k)
