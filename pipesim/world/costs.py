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


@dataclass(frozen=True)
class Payloads:
    """Message sizes in bytes, derived from the target's shape and the scenario's return mode."""

    d_model: int
    vocab_size: int
    activation_bytes: float = 4.0
    return_mode: str = "logits"
    top_k: int = 8
    header_bytes: int = 64
    per_token_header_bytes: int = 16
    kv_op_bytes: int = 24

    def activations(self, n_tokens: int, n_kv_ops: int = 0) -> float:
        return self.header(n_tokens, n_kv_ops) + n_tokens * self.d_model * self.activation_bytes

    def header(self, n_tokens: int, n_kv_ops: int = 0) -> float:
        return self.header_bytes + n_tokens * self.per_token_header_bytes + n_kv_ops * self.kv_op_bytes

    def predictions(self, n_outputs: int) -> float:
        if self.return_mode == "logits":
            per_token = self.vocab_size * 4.0
        elif self.return_mode == "topk":
            per_token = self.top_k * 8.0
        else:
            per_token = 4.0
        return self.header_bytes + n_outputs * per_token

    def cancel(self, n_runs: int) -> float:
        return self.header_bytes + 8.0 * n_runs


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
