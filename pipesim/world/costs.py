"""Cost model of the simulator: how long a node takes to evaluate layers for a run (roofline by default)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..models.catalog import ModelSpec


@dataclass(frozen=True)
class NodeProfile:
    """A node's effective compute throughput (FLOP/s), memory bandwidth (B/s) and fixed per-run overhead (s)."""

    name: str
    flops: float
    memory_bandwidth: float
    overhead_per_run: float = 0.0


class StageCost(NamedTuple):
    """Time of one run on one stage: the total and the time per layer (for aborts at layer granularity).
    (A named tuple: the simulator builds one per run and stage, and a frozen dataclass costs three times more.)"""

    total: float
    per_layer: float
    n_layers: int
    dispatch: float = 0.0  # part of ``total`` spent on messaging/scheduling before the forward (not compute)


class RooflineCostModel:
    """Roofline over the layers a stage holds: time = max(FLOPs / FLOP/s, bytes / (B/s)) per layer.

    Weights are read once per run, so a run of n tokens costs far less than n single-token runs while
    memory-bound. Attention reads the KV cache of the context (``kv_bytes`` per element) and costs
    4·d_model FLOPs per token and attended position. The last stage adds the output head for the tokens whose
    predictions return to the head. A mixture-of-experts layer charges each token the FLOPs of its active experts
    and reads the weights of the experts some token of the run routes to (uniform routing).
    """

    def __init__(self, spec: ModelSpec, kv_bytes: float = 2.0) -> None:
        self.spec = spec
        self.kv_bytes = kv_bytes
        self._layer_weight_bytes = spec.params_per_layer * spec.bytes_per_weight
        self._layer_flops_per_token = 2.0 * spec.active_params_per_layer
        self._head_weight_bytes = spec.output_head_params * spec.bytes_per_weight
        self._attention_flops = 4.0 * spec.d_model  # per token and attended position
        self._kv_elements = 2.0 * spec.kv_dim  # K and V per attended position
        self._dense = spec.n_experts <= 1

    def layer_weight_bytes(self, n_tokens: int) -> float:
        """Weight bytes one layer reads for a run of ``n_tokens`` tokens."""
        if self.spec.n_experts <= 1:
            return self._layer_weight_bytes
        return self.spec.touched_params_per_layer(n_tokens) * self.spec.bytes_per_weight

    def layer_time(self, node: NodeProfile, n_tokens: int, context: int) -> float:
        """One layer for a run of ``n_tokens`` tokens after ``context`` cached positions."""
        attended = context + n_tokens  # positions attended by the last token (causal within the run)
        flops = n_tokens * (self._layer_flops_per_token + self._attention_flops * (context + (n_tokens + 1) / 2))
        kv_read = self._kv_elements * attended * self.kv_bytes
        weights = self._layer_weight_bytes if self._dense else self.layer_weight_bytes(n_tokens)
        return max(flops / node.flops, (weights + kv_read) / node.memory_bandwidth)

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


class FloorCostModel(RooflineCostModel):
    """The roofline plus a floor: each layer costs at least a fixed time however few tokens a run has.

    time of a layer = floor(node) + max(FLOPs / FLOP/s, bytes / (B/s)), with the node's sustained figures (the
    hardware catalog's peak x fraction) and its per-layer floor (kernel launches and synchronisation of the
    layer's ops, which a roofline has not). The output head costs an eighth of a layer's floor on top of its
    roofline (two of a layer's ~16 kernels: the final norm and the matmul). So a single-token step is floor +
    weights / bandwidth, a multi-token verification costs about the same until the FLOPs of the run catch up
    with the weight reads, and a long prefill is compute-bound.

    Published measurements it reproduces (llama.cpp CUDA, one GPU, batch 1; XiongjieDai/GPU-Benchmarks-on-LLM-
    Inference, README, Dec 2023 snapshot): with the catalog's ``a100-80gb`` and ``h100-pcie`` figures (fitted
    to these), Llama-2-7B q4_0 / f16 and 70B q4_0 generate at 136 / 73 / 26 tokens/s on the A100 80GB
    (measured 136.24 / 73.83 / 25.68) and 135 / 77 / 28 on the H100 PCIe (measured 133.77 / 83.32 / 25.88);
    prompt evaluation of 7B f16 (512 tokens) runs at about 5100 and 7400 tokens/s (measured 5105.77 and 7367).
    ``tests/test_hardware_costs.py`` checks these against the published numbers.
    """

    HEAD_FLOOR_SHARE = 1.0 / 8.0

    def __init__(self, spec: ModelSpec, kv_bytes: float = 2.0, layer_floors: Mapping[str, float] | None = None,
                 default_floor: float = 0.0) -> None:
        super().__init__(spec, kv_bytes)
        self.layer_floors = dict(layer_floors or {})
        self.default_floor = default_floor

    def floor(self, node: NodeProfile) -> float:
        """The per-layer floor of a node (by name; nodes not listed get the default)."""
        return self.layer_floors.get(node.name, self.default_floor)

    def layer_time(self, node: NodeProfile, n_tokens: int, context: int) -> float:
        return self.floor(node) + super().layer_time(node, n_tokens, context)

    def output_head_time(self, node: NodeProfile, n_outputs: int) -> float:
        return self.HEAD_FLOOR_SHARE * self.floor(node) + super().output_head_time(node, n_outputs)


def scenario_nodes(scenario: Any) -> list[NodeProfile]:
    """Every node's profile: the cluster template with per-node overrides (as both engines build them)."""
    cluster = scenario.cluster
    nodes = [NodeProfile(f"n{i}", cluster.flops, cluster.memory_bandwidth, cluster.overhead_per_run)
             for i in range(cluster.count)]
    for o in cluster.overrides:
        base = nodes[o.index]
        nodes[o.index] = NodeProfile(base.name, o.flops if o.flops is not None else base.flops,
                                     o.memory_bandwidth if o.memory_bandwidth is not None else base.memory_bandwidth,
                                     o.overhead_per_run if o.overhead_per_run is not None else base.overhead_per_run)
    return nodes


def layer_floors(scenario: Any) -> dict[str, float]:
    """Per node name (``n0``, ``n1``, ...), the layer floor a scenario gives it (cluster default, overrides)."""
    cluster = scenario.cluster
    floors = {f"n{i}": cluster.layer_floor or 0.0 for i in range(cluster.count)}
    for override in cluster.overrides:
        if override.layer_floor is not None:
            floors[f"n{override.index}"] = override.layer_floor
    return floors


def make_cost_model(spec: ModelSpec, scenario: Any, role: str = "target", profile: Any = None):
    """The cost model a scenario selects for one model: the fitted ``profile`` (``cluster.profile``) if given,
    else ``cluster.cost_model`` (``roofline``, the default, or ``floor``). The one place that chooses."""
    if profile is not None:
        return CalibratedCostModel(spec, profile, role)
    kv_bytes = scenario.models.kv_bytes
    if scenario.cluster.cost_model == "floor":
        return FloorCostModel(spec, kv_bytes, layer_floors(scenario))
    return RooflineCostModel(spec, kv_bytes)


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
