"""Memory a placement needs on each node, and the check that it fits.

A node holds: the weights of its target layers at their quantization (the first node also the token embedding
table, the last the output head unless embeddings are tied and both are on one node; the head node also the
whole draft model: the draft's node, ``placement.draft_node``, the head by default, which may hold no target
layers at all), the KV cache of those layers for every cell that can be live at once, and activation
buffers for the largest run. KV cells: prompt + generated tokens, plus the speculative tokens that can be in
flight (PipeInfer: runs in flight x micro-batch, every run owning a KV sequence partition; speculative: γ),
bounded by the tokens to generate (a speculated cell is a future position). Activation buffers (an estimate
after llama.cpp's compute buffer): per token of the largest run, 4 residual-width and 2 MLP-width f32 vectors
plus f32 attention scores over the context for every head, and the f32 logits on the last node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..models.catalog import ModelSpec
from ..placement import split_layers, target_stages


@dataclass(frozen=True)
class NodeMemory:
    """What one node needs (bytes) next to what it has (None: unknown, not checked)."""

    node: str
    layers: tuple[int, int]  # target layers [start, end)
    weights: float
    kv_cache: float
    activations: float
    available: float | None

    @property
    def needed(self) -> float:
        return self.weights + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.available is None or self.needed <= self.available


class MemoryFitError(ValueError):
    """A placement that does not fit a node's memory (one line: node, bytes needed and available)."""


def kv_cells(scenario: Any) -> int:
    """KV cells that can be live at once: prompt + generated + speculative tokens in flight."""
    workload, strategy = scenario.workload, scenario.strategy
    name = strategy.name
    if name in ("pipeinfer", "speed"):
        runs = min(strategy.max_runs_in_flight or strategy.n_partitions, strategy.n_partitions)
        speculative = runs * (strategy.micro_batch if name == "pipeinfer" else 1)
    elif name == "speculative":
        speculative = strategy.gamma
    elif name in ("pipespec", "pipespec-sync"):
        speculative = strategy.chain_knobs()["lookahead"]
    else:
        speculative = 0
    return workload.prompt_tokens + workload.generate_tokens + min(speculative, workload.generate_tokens)


def layer_kv_bytes(spec: ModelSpec, cells: int, kv_bytes: float) -> float:
    """K and V of one layer for ``cells`` positions."""
    return 2.0 * spec.kv_dim * cells * kv_bytes


def activation_bytes(spec: ModelSpec, run_tokens: int, context: int, logits: int = 0) -> float:
    """Activation buffers of a run of ``run_tokens`` tokens over ``context`` positions (f32), logits on top."""
    per_token = 4 * spec.d_model + 2 * spec.d_ffn + spec.n_heads * context
    return 4.0 * (run_tokens * per_token + logits * spec.vocab_size)


def _model_on_nodes(spec: ModelSpec, ranges: list[tuple[int, int]], cells: int, kv_bytes: float,
                    run_tokens: int, logits: int) -> list[tuple[float, float, float]]:
    """(weights, KV, activations) per node of one model split over ``ranges``."""
    embedding = spec.vocab_size * spec.d_model * spec.bytes_per_weight
    out = []
    last = len(ranges) - 1
    for i, (start, end) in enumerate(ranges):
        weights = (end - start) * spec.params_per_layer * spec.bytes_per_weight
        if i == 0:
            weights += embedding
        if i == last and not (spec.tied_embeddings and last == 0):
            weights += embedding  # the output head
        kv = (end - start) * layer_kv_bytes(spec, cells, kv_bytes)
        acts = activation_bytes(spec, run_tokens, cells, logits if i == last else 0)
        out.append((weights, kv, acts))
    return out


def memory_plan(scenario: Any) -> list[NodeMemory]:
    """Per node, the memory the scenario's placement needs and the memory the node has."""
    cluster, models = scenario.cluster, scenario.models
    count = cluster.count
    available: list[float | None] = [cluster.memory] * count
    for override in cluster.overrides:
        if override.memory is not None:
            available[override.index] = override.memory
    cells = kv_cells(scenario)
    run_tokens = scenario.workload.prompt_tokens  # the prefill is the largest run
    strategy = scenario.strategy
    outputs = 1 + max(strategy.gamma, strategy.micro_batch, strategy.chain_knobs()["max_verify"]
                      if strategy.name.startswith("pipespec") else 0)  # most logits one run returns
    # (model, its nodes, its layer split, whether it is the target)
    if strategy.name in ("pipespec", "pipespec-sync"):
        specs = models.chain_specs()
        placed = [(spec, group, None, i == len(specs) - 1)
                  for i, (spec, group) in enumerate(zip(specs, scenario.chain_node_groups(), strict=True))]
    else:
        target = models.target_spec()
        stage_nodes, ranges = target_stages(target.n_layers, scenario.placement.layer_split, count)
        placed = [(target, stage_nodes, ranges, True)]
        draft = models.draft_spec()
        if draft is not None and strategy.name != "iterative":
            placed.append((draft, [scenario.placement.draft_node], None, False))
    totals = [[0.0, 0.0, 0.0] for _ in range(count)]
    layers: list[tuple[int, int]] = [(0, 0)] * count
    for spec, nodes, ranges, is_target in placed:
        ranges = ranges if ranges is not None else split_layers(spec.n_layers, None, len(nodes))
        parts = _model_on_nodes(spec, ranges, cells, models.kv_bytes, run_tokens, outputs)
        for node, layer_range, part in zip(nodes, ranges, parts, strict=True):
            for k in range(3):
                totals[node][k] += part[k]
            if is_target:
                layers[node] = layer_range
    return [NodeMemory(f"n{i}", layers[i], *totals[i], available[i]) for i in range(count)]


def format_bytes(n: float) -> str:
    """Decimal gigabytes (or megabytes below 1 GB), e.g. ``74.3 GB``."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_memory_fit(scenario: Any) -> list[NodeMemory]:
    """The memory plan; raises MemoryFitError on the first node whose needs exceed its known capacity."""
    plan = memory_plan(scenario)
    for node in plan:
        if not node.fits:
            start, end = node.layers
            held = f"layers {start}-{end - 1}" if end > start else "no target layers"
            raise MemoryFitError(
                f"does not fit: node {node.node} ({held}) needs {format_bytes(node.needed)} "
                f"({node.needed:.0f} bytes: weights {format_bytes(node.weights)}, KV cache "
                f"{format_bytes(node.kv_cache)}, activations {format_bytes(node.activations)}) but has "
                f"{format_bytes(node.available)} ({node.available:.0f} bytes)")
    return plan
