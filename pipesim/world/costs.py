"""Cost model of the simulator: how long a node takes to evaluate layers for a run (roofline by default)."""

from __future__ import annotations

from dataclasses import dataclass

from ..models.catalog import ModelSpec


@dataclass(frozen=True)
class NodeProfile:
    """A node's effective compute throughput (FLOP/s), memory bandwidth (B/s) and fixed per-run overhead (s)."""

    name: str
    flops: float
    memory_bandwidth: float
    overhead_per_run: float = 0.0


@dataclass(frozen=True)
class StageCost:
    """Time of one run on one stage: the total and the time per layer (for aborts at layer granularity)."""

    total: float
    per_layer: float
    n_layers: int
    dispatch: float = 0.0  # part of ``total`` spent on messaging/scheduling before the forward (not compute)


class RooflineCostModel:
    """Roofline over the layers a stage holds: time = max(FLOPs / FLOP/s, bytes / (B/s)) per layer.

    Weights are read once per run, so a run of n tokens costs far less than n single-token runs while
    memory-bound. Attention reads the KV cache of the context (``kv_bytes`` per element) and costs
    4·d_model FLOPs per token and attended position. The last stage adds the output head for the tokens whose
    predictions return to the head.
    """

    def __init__(self, spec: ModelSpec, kv_bytes: float = 2.0) -> None:
        self.spec = spec
        self.kv_bytes = kv_bytes
        self._layer_weight_bytes = spec.params_per_layer * spec.bytes_per_weight
        self._layer_flops_per_token = 2.0 * spec.params_per_layer
        self._head_weight_bytes = spec.output_head_params * spec.bytes_per_weight

    def layer_time(self, node: NodeProfile, n_tokens: int, context: int) -> float:
        """One layer for a run of ``n_tokens`` tokens after ``context`` cached positions."""
        spec = self.spec
        attended = context + n_tokens  # positions attended by the last token (causal within the run)
        flops = n_tokens * (self._layer_flops_per_token + 4.0 * spec.d_model * (context + (n_tokens + 1) / 2))
        kv_read = 2.0 * spec.kv_dim * attended * self.kv_bytes
        return max(flops / node.flops, (self._layer_weight_bytes + kv_read) / node.memory_bandwidth)

    def output_head_time(self, node: NodeProfile, n_outputs: int) -> float:
        flops = 2.0 * self.spec.output_head_params * n_outputs
        return max(flops / node.flops, self._head_weight_bytes / node.memory_bandwidth)

    def stage_cost(self, node: NodeProfile, n_layers: int, n_tokens: int, context: int,
                   n_outputs: int = 0) -> StageCost:
        """A stage holding ``n_layers`` layers (and the output head when ``n_outputs`` > 0)."""
        per_layer = self.layer_time(node, n_tokens, context)
        total = node.overhead_per_run + n_layers * per_layer
        if n_outputs:
            total += self.output_head_time(node, n_outputs)
        return StageCost(total, per_layer, n_layers)

    def model_cost(self, node: NodeProfile, n_tokens: int, context: int) -> float:
        """A whole model on one node (e.g. a draft step producing one token after a batch of n tokens)."""
        return self.stage_cost(node, self.spec.n_layers, n_tokens, context, n_outputs=1).total


# The executor's frames (``pipesim.executor.protocol``): int64 values, a 3-value prefix (send time, payload
# description), then the body; activations and logits travel as float32 payloads after the frame.
_INT = 8
_PREFIX = 3
_RUN_HEAD = 6  # run_id, flags, n_tokens, output_from, n_seqs, n_ops
_PRED_HEAD = 4  # run_id, mode, n_outputs, width
_OP_VALUES = 5  # kind, seq, dst, p0, p1


@dataclass(frozen=True)
class Payloads:
    """Message sizes in bytes: the executor protocol's frames, for the model's shape and the return mode.

    A run's frame holds its tokens and positions, its sequence ids and its KV operations (and SPEED's exit
    layer); computed runs carry ``n_tokens x d_model`` activations of ``activation_bytes``. Predictions are full
    float32 logits, top-k (an int64 id and a float32 value per candidate) or int64 greedy ids.
    """

    d_model: int
    vocab_size: int
    activation_bytes: float = 4.0
    return_mode: str = "logits"
    top_k: int = 8

    def activations(self, n_tokens: int, n_kv_ops: int = 0, n_seqs: int = 1, exit_layer: bool = False) -> float:
        return self.header(n_tokens, n_kv_ops, n_seqs, exit_layer) + n_tokens * self.d_model * self.activation_bytes

    def header(self, n_tokens: int, n_kv_ops: int = 0, n_seqs: int = 1, exit_layer: bool = False) -> float:
        """A run's frame without activations (a run forwarded after a skip)."""
        return _INT * (_PREFIX + _RUN_HEAD + 2 * n_tokens + n_seqs + _OP_VALUES * n_kv_ops + int(exit_layer))

    def predictions(self, n_outputs: int) -> float:
        frame = _INT * (_PREFIX + _PRED_HEAD)
        if self.return_mode == "logits":
            return frame + n_outputs * self.vocab_size * 4.0
        if self.return_mode == "topk":
            return frame + n_outputs * min(self.top_k, self.vocab_size) * (_INT + 4.0)
        return frame + n_outputs * _INT

    def cancel(self, n_runs: int) -> float:
        return _INT * (_PREFIX + n_runs)

    def early_exit(self) -> float:
        """SPEED: an early prediction (run id, position, token)."""
        return _INT * (_PREFIX + 3)

    def level_message(self, n_tokens: int) -> float:
        """A message between the levels of a PipeSpec chain carrying ``n_tokens`` token ids."""
        return _INT * (_PREFIX + 6 + n_tokens)


class CalibratedCostModel:
    """Costs from a fitted hardware profile (``pipesim calibrate``), with the roofline model's interface.

    ``role="target"`` uses each node's stage coefficients, ``role="draft"`` its draft coefficients.
    """

    def __init__(self, spec: ModelSpec, profile, role: str = "target") -> None:
        if role not in ("target", "draft"):
            raise ValueError(f"role must be 'target' or 'draft', got {role!r}")
        self.spec = spec
        self.profile = profile
        self.role = role

    def stage_cost(self, node: NodeProfile, n_layers: int, n_tokens: int, context: int,
                   n_outputs: int = 0) -> StageCost:
        coefficients = self.profile.node(node.name)
        total, per_layer = coefficients.stage_time(n_layers, n_tokens, context, n_outputs)
        return StageCost(total + coefficients.dispatch, per_layer, n_layers, coefficients.dispatch)

    def output_head_time(self, node: NodeProfile, n_outputs: int) -> float:
        coefficients = self.profile.node(node.name)
        if n_outputs == 1 and coefficients.head_single is not None:
            return coefficients.head_single
        return coefficients.head_fixed + coefficients.head_per_output * n_outputs

    def model_cost(self, node: NodeProfile, n_tokens: int, context: int) -> float:
        coefficients = self.profile.node(node.name)
        if self.role == "draft":
            return coefficients.draft_time(n_tokens, context)
        return self.stage_cost(node, self.spec.n_layers, n_tokens, context, n_outputs=1).total
