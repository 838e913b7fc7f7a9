"""Scenarios: validated descriptions of a cluster, a model pair, a workload and a strategy.

A scenario is written in YAML; ``load_scenario`` applies ``--set dotted.key=value`` overrides to the raw
document, validates it, and turns every problem into one ``ScenarioError`` line naming the field and value.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .executor_config import ExecutorConfig
from .hardware import get_network_preset, get_node_type
from .models.catalog import QUANTIZATION_BITS, ModelSpec
from .models.shapes import model_shape
from .strict import StrictModel
from .units import parse_bandwidth, parse_bytes, parse_duration, parse_rate
from .yamlio import YAMLFileError, parse_yaml, read_yaml

Bandwidth = Annotated[float, BeforeValidator(parse_bandwidth), Field(gt=0, description="bytes/s or e.g. 1Gbit/s")]
Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0, description="seconds or e.g. 50us")]
FlopRate = Annotated[float, BeforeValidator(parse_rate), Field(gt=0, description="FLOP/s or e.g. 400G")]
Bytes = Annotated[float, BeforeValidator(parse_bytes), Field(gt=0, description="bytes or e.g. 80GB, 80GiB")]
ModelRef = str | dict[str, Any]
STRATEGY_NAMES = ("iterative", "speculative", "pipeinfer", "speed", "pipespec", "pipespec-sync")
CHAIN_STRATEGIES = ("pipespec", "pipespec-sync")
# Each strategy's variants, its default first: "reference" behaves as the authors' code runs it; the others are
# named departures (README, "Strategies and their variants").
STRATEGY_VARIANTS: dict[str, tuple[str, ...]] = {
    "iterative": ("reference",),
    "speculative": ("reference",),
    "pipeinfer": ("reference", "continuous"),
    "speed": ("reference",),
    "pipespec": ("reference", "capped"),
    "pipespec-sync": ("reference", "verify-only"),
}


class ScenarioError(ValueError):
    """A scenario that cannot be used; the message is one line naming the field and the value."""


class _Strict(StrictModel):
    """A scenario section (see ``StrictModel``: no extra fields, finite numbers, no booleans as numbers)."""


class ModelsConfig(_Strict):
    """Target and draft models (names from the catalog) and how they are stored."""

    target: ModelRef = Field(description="target model: a catalog name (e.g. llama-2-70b), a Hugging Face "
                                          "config.json or GGUF file path, or an inline shape mapping")
    target_quantization: str | None = Field(None, description="weight quantization, e.g. q3_k_m (default f16)")
    draft: ModelRef | None = Field(None, description="draft model, as target (e.g. tinyllama-1.1b)")
    draft_quantization: str | None = None
    chain: list[ModelRef] | None = Field(
        None, description="PipeSpec: draft models smallest first, 'name' or 'name:quantization' or a file path or "
                          "an inline shape (default: [draft])")
    kv_bytes: float = Field(2.0, gt=0, description="bytes per KV-cache element (f16: 2)")
    activation_bytes: float = Field(4.0, gt=0, description="bytes per activation element sent between stages")

    @field_validator("target", "draft")
    @classmethod
    def _known_model(cls, ref: ModelRef | None) -> ModelRef | None:
        if ref is not None:
            model_shape(ref)
        return ref

    @field_validator("target_quantization", "draft_quantization")
    @classmethod
    def _known_quantization(cls, name: str | None) -> str | None:
        if name is not None and name.lower() not in QUANTIZATION_BITS:
            raise ValueError(f"unknown quantization (known: {', '.join(sorted(QUANTIZATION_BITS))})")
        return name

    def target_spec(self) -> ModelSpec:
        spec = model_shape(self.target)
        return spec.quantized(self.target_quantization) if self.target_quantization else spec

    @field_validator("chain")
    @classmethod
    def _known_chain(cls, items: list[ModelRef] | None) -> list[ModelRef] | None:
        for item in items or []:
            _chain_entry_spec(item)
        return items

    def chain_specs(self) -> list[ModelSpec]:
        """PipeSpec's models, smallest draft first and the target last."""
        if self.chain is not None:
            specs = [_chain_entry_spec(item) for item in self.chain]
        else:
            specs = [self.draft_spec()]
        return [*specs, self.target_spec()]

    def draft_spec(self) -> ModelSpec | None:
        if self.draft is None:
            return None
        spec = model_shape(self.draft)
        return spec.quantized(self.draft_quantization) if self.draft_quantization else spec


def _chain_entry_spec(item: ModelRef) -> ModelSpec:
    """A chain entry: an inline shape, or 'ref' / 'ref:quantization' (ref a catalog name or a file path)."""
    if isinstance(item, dict):
        return model_shape(item)
    ref, sep, quantization = item.rpartition(":")
    if not sep or "/" in quantization or "." in quantization:
        ref, quantization = item, ""
    elif quantization and quantization.lower() not in QUANTIZATION_BITS:
        raise ValueError(f"unknown quantization {quantization!r} in {item!r}")
    spec = model_shape(ref)
    return spec.quantized(quantization) if quantization else spec


def _known_hardware(name: str | None) -> str | None:
    if name is not None:
        get_node_type(name)
    return name


def _fill_from_hardware(values: dict[str, Any], dtype: str | None) -> None:
    """Fill the node figures a mapping leaves out from its ``hardware`` entry (unknown names are left to the
    field validator, which names the field)."""
    name = values.get("hardware")
    if not isinstance(name, str):
        return
    try:
        node = get_node_type(name)
        flops = node.flops(dtype)
    except ValueError:
        return
    for key, value in (("flops", flops), ("memory_bandwidth", node.sustained_bandwidth()), ("memory", node.memory),
                       ("layer_floor", node.layer_floor)):
        if values.get(key) is None:
            values[key] = value


class NodeOverride(_Strict):
    """Per-node changes for heterogeneous clusters (``hardware`` fills what is not given)."""

    index: int = Field(ge=0)
    hardware: str | None = Field(None, description="node type from `pipesim hardware list`")
    flops: FlopRate | None = None
    memory_bandwidth: Bandwidth | None = None
    memory: Bytes | None = None
    layer_floor: Duration | None = None
    overhead_per_run: Duration | None = None

    @field_validator("hardware")
    @classmethod
    def _known_hardware(cls, name: str | None) -> str | None:
        return _known_hardware(name)


class ClusterConfig(_Strict):
    """Nodes of the cluster: a template applied to ``count`` nodes, with optional per-node overrides.

    ``hardware`` names a node type of the catalog; it fills ``flops``, ``memory_bandwidth`` (sustained figures),
    ``memory`` and ``layer_floor``, and explicit fields override it."""

    count: int = Field(ge=1, le=4096, description="number of nodes")
    hardware: str | None = Field(None, description="node type from `pipesim hardware list`, e.g. h100-sxm")
    compute_dtype: str | None = Field(None, description="dtype whose peak FLOP/s the hardware figure uses "
                                                        "(default: fp16 on GPUs, fp32 on CPU nodes)")
    flops: FlopRate = Field(description="effective compute throughput of one node")
    memory_bandwidth: Bandwidth = Field(description="effective memory bandwidth of one node")
    memory: Bytes | None = Field(None, description="memory capacity of one node; when known (given or from "
                                                   "hardware) the placement must fit it")
    layer_floor: Duration | None = Field(None, description="floor cost model: least time of one layer")
    cost_model: Literal["roofline", "floor"] = Field(
        "roofline", description="roofline, or floor: the roofline plus a per-layer minimum time (kernel launches)")
    overhead_per_run: Duration = Field(0.0, description="fixed time a node spends per run it evaluates")
    kv_transaction_time: Duration = Field(
        10e-6, description="pipeinfer, kv_transactions=reference: time every stage spends on one relayed KV "
                           "transaction (seq_rm/seq_cp: four small eager MPI messages per hop in ggml-mpi.c; an "
                           "assumed 10us, not measured: set it from your cluster)")
    kv_relay: Literal["pipelined", "serial"] = Field(
        "pipelined", description="pipeinfer, kv_transactions=reference: pipelined (as ggml-mpi.c relays them: a "
                                 "stage passes each transaction on before applying it, so the stages work on a "
                                 "burst together) or serial (each stage spends the whole burst's time when the "
                                 "run reaches it, the earlier model)")
    overrides: list[NodeOverride] = Field(default_factory=list)
    profile: str | None = Field(
        None, description="hardware profile from `pipesim calibrate` (fitted costs replace the roofline; "
                          "a relative path is looked up from the scenario file's folder too)")
    chain_profiles: list[str | None] | None = Field(
        None, description="pipespec: a hardware profile per draft model of models.chain (smallest first; null: "
                          "roofline); cluster.profile is the target's")

    @field_validator("hardware")
    @classmethod
    def _known_hardware(cls, name: str | None) -> str | None:
        return _known_hardware(name)

    @model_validator(mode="before")
    @classmethod
    def _from_hardware(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        dtype = data.get("compute_dtype")
        _fill_from_hardware(data, dtype)
        if data.get("flops") is None or data.get("memory_bandwidth") is None:
            missing = "flops" if data.get("flops") is None else "memory_bandwidth"
            if not data.get("hardware"):
                raise ValueError(f"{missing} is needed, or hardware (a node type, e.g. h100-sxm; "
                                 "see `pipesim hardware list`)")
        overrides = data.get("overrides")
        if isinstance(overrides, list):
            data["overrides"] = [_filled_override(o, dtype) for o in overrides]
        return data


def _filled_override(override: Any, dtype: str | None) -> Any:
    if not isinstance(override, dict):
        return override
    override = dict(override)
    _fill_from_hardware(override, dtype)
    return override


def _known_preset(name: str | None) -> str | None:
    if name is not None:
        get_network_preset(name)
    return name


def _fill_from_preset(values: dict[str, Any]) -> None:
    name = values.get("preset")
    if not isinstance(name, str):
        return
    try:
        preset = get_network_preset(name)
    except ValueError:
        return
    for key, value in (("bandwidth", preset.bandwidth), ("latency", preset.latency)):
        if values.get(key) is None:
            values[key] = value


class LinkOverride(_Strict):
    """Per-link changes: the link between two node indices (both directions)."""

    between: tuple[int, int]
    preset: str | None = Field(None, description="interconnect from `pipesim hardware list`, e.g. nvlink4")
    bandwidth: Bandwidth | None = None
    latency: Duration | None = None

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str | None) -> str | None:
        return _known_preset(name)

    @model_validator(mode="before")
    @classmethod
    def _from_preset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            _fill_from_preset(data)
        return data


class NetworkConfig(_Strict):
    """Interconnect: every link has this latency and bandwidth unless overridden (``preset`` fills them)."""

    preset: str | None = Field(None, description="interconnect from `pipesim hardware list`, e.g. ib-ndr, 10gbe")
    bandwidth: Bandwidth = Field(description="link bandwidth, e.g. 1Gbit/s")
    latency: Duration = Field(0.0, description="one-way message latency, e.g. 50us")
    links: list[LinkOverride] = Field(default_factory=list)
    profile_links: Literal["add", "ignore"] = Field(
        "add", description="with cluster.profile: add the profile's measured MPI transport (latency, copies) to "
                           "every link, or ignore it")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str | None) -> str | None:
        return _known_preset(name)

    @model_validator(mode="before")
    @classmethod
    def _from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        _fill_from_preset(data)
        if data.get("bandwidth") is None and not data.get("preset"):
            raise ValueError("bandwidth is needed, or preset (e.g. 10gbe, ib-ndr; see `pipesim hardware list`)")
        return data


class PlacementConfig(_Strict):
    """Where the target layers and the draft model live."""

    layer_split: list[Annotated[float, Field(ge=0)]] | None = Field(
        None, description="fraction of the target's layers on each node, in pipeline order (default: even); 0 "
                          "for the draft node: it holds the draft only")
    draft_node: int = Field(0, ge=0, description="node running the draft model: the head (0, the default) or any "
                                                 "other node, which then exchanges each draft step with the head "
                                                 "over their link")
    chain_nodes: list[list[Annotated[int, Field(ge=0)]]] | None = Field(
        None, description="PipeSpec: node indices of each model of the chain, drafts first, target last "
                          "(default: one node per draft, the rest for the target)")


class AcceptanceConfig(_Strict):
    """How often drafted tokens match the target (simulator and oracle drafts)."""

    model: Literal["iid", "positional", "replay", "markov"] = "iid"
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="i.i.d. acceptance probability per drafted token")
    alphas: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=list, description="positional: acceptance by depth ahead of the committed sequence")
    sequence: list[Annotated[int, Field(ge=0, le=1)]] = Field(
        default_factory=list, description="replay: 1/0 per generated position (draft right/wrong)")
    exit_alphas: dict[int, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=dict, description="speed: alpha by strategy.exit_layer (linear between the layers given; "
                                          "replaces acceptance.alpha), e.g. measured by `pipesim models train-exit`")
    chain_alphas: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=list, description="PipeSpec: per draft model (smallest first), how often its token equals "
                                          "the target's (non-decreasing; default: alpha^((k-i)/k))")
    p_after_accept: float | None = Field(
        None, ge=0.0, le=1.0, description="markov: P(draft right at a position | right at the one before)")
    p_after_reject: float | None = Field(
        None, ge=0.0, le=1.0, description="markov: P(draft right at a position | wrong at the one before)")
    p_first: float | None = Field(
        None, ge=0.0, le=1.0, description="markov: P(right at the first generated position) (default: the "
                                          "stationary rate p_after_reject / (1 - p_after_accept + p_after_reject))")
    confidence: bool = Field(False, description="the oracle draft reports a draft probability per token "
                                                "(Beta by right/wrong) and stops below strategy.min_confidence")
    confidence_right: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = Field(
        (8.0, 2.0), description="confidence: Beta(a, b) of a right token's draft probability")
    confidence_wrong: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = Field(
        (2.0, 5.0), description="confidence: Beta(a, b) of a wrong token's draft probability")
    confidence_second: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = Field(
        (1.0, 2.0), description="confidence, token trees: Beta(a, b) of each alternative candidate's share of the "
                                "probability the candidates before it leave")
    seed: int = 0

    @model_validator(mode="after")
    def _check_markov(self) -> AcceptanceConfig:
        if self.model == "markov" and (self.p_after_accept is None or self.p_after_reject is None):
            raise ValueError("model=markov needs p_after_accept and p_after_reject")
        return self


class WorkloadConfig(_Strict):
    """The request: prompt length and number of tokens to generate."""

    prompt_tokens: int = Field(32, ge=1, le=1_000_000)
    generate_tokens: int = Field(64, ge=1, le=10_000_000)
    seed: int = 0


class StrategyConfig(_Strict):
    """Which strategy runs, and its knobs (each strategy reads the ones it has)."""

    name: Literal["iterative", "speculative", "pipeinfer", "speed", "pipespec", "pipespec-sync"] = "pipeinfer"
    variant: str = Field("reference", description="how the strategy runs: 'reference' as its authors' code does, "
                                                  "or a named departure (see STRATEGY_VARIANTS)")
    gamma: int = Field(4, ge=1, le=64, description="speculative: drafted tokens per verification")
    micro_batch: int = Field(3, ge=1, le=64, description="pipeinfer: drafted tokens per speculative run")
    min_confidence: float = Field(0.1, ge=0.0, le=1.0, description="draft confidence cut-off")
    max_runs_in_flight: int | None = Field(None, ge=1, description="pipeinfer: bound on valid runs in flight")
    n_partitions: int = Field(1000, ge=1, description="pipeinfer: KV partitions in the pool")
    early_cancellation: bool = Field(True, description="pipeinfer/speed: cancel invalidated runs")
    exit_layer: int = Field(8, ge=0, description="speed: layer whose hidden state predicts the next token")
    lookahead: int | None = Field(
        None, ge=0, le=256, description="pipespec reference: a model verifies once the one before it holds "
        "lookahead-1 tokens more (0: whenever; default 0, pipespec-sync 5, as decoding.py); capped / verify-only: "
        "how far a model may run ahead of the next one (>= 1, default 8)")
    max_verify: int | None = Field(
        None, ge=1, le=256, description="pipespec reference: most tokens a verification feeds, its last verified "
        "token included (max_verify_tokens, default 100); capped / verify-only: most candidates (default 16)")
    handshake: bool | None = Field(
        None, description="pipespec reference: a verifier waits for the model before it to resync before its "
        "next step (decoding.py sync_requests/sync_responses; default true)")
    # -- pipeinfer: each departure from the reference code is a switch; None takes the variant's setting
    # (PIPEINFER_VARIANT_SWITCHES), so an ablation turns them on one at a time
    pipeinfer_run_pattern: Literal["reference", "continuous"] | None = Field(
        None, description="pipeinfer: 'reference' launches a single-token run after every verification that commits "
                          "tokens and restarts speculation from there (speculative.cpp); 'continuous' keeps one "
                          "chain going and launches a single-token run only when it breaks")
    pipeinfer_head_priority: Literal["run", "step"] | None = Field(
        None, description="pipeinfer: when the head looks for returned predictions: 'run' only between whole "
                          "speculative runs (all draft steps and the head's own layers, as speculative.cpp), 'step' "
                          "between single draft steps")
    pipeinfer_sync_prefill: bool | None = Field(
        None, description="pipeinfer: process the prompt before any speculation (speculative.cpp), else speculate "
                          "during the prefill")
    pipeinfer_cancelled_traffic: Literal["full", "header"] | None = Field(
        None, description="pipeinfer: a cancelled run still travels as full activations and the last stage returns "
                          "its full logits ('full', ggml-mpi.c), or goes on as a header only when it carries KV "
                          "operations ('header')")
    kv_transactions: Literal["reference", "compact"] | None = Field(
        None, description="pipeinfer: charge every seq_rm/seq_cp the reference issues as its own transaction at "
                          "every stage ('reference': thousands per verification, cluster.kv_transaction_time each), "
                          "or carry the few operations needed in the next run's header for free ('compact')")
    p_recovery: float = Field(0.0, ge=0.0, le=1.0, description="pipeinfer: p_adjust grows by this per speculative "
                                                                "run of one speculation loop (speculative.cpp)")
    p_decay: float = Field(0.0, ge=0.0, le=1.0, description="pipeinfer: p_adjust falls by this per draft that "
                                                             "stopped before its first token (speculative.cpp)")
    # -- pipeinfer token trees (speculative.cpp start_async_spec_run; common.h defaults -np 1, -ps 0.1)
    n_parallel: int = Field(1, ge=1, le=64, description="pipeinfer: most branches of a drafted token tree "
                                                         "(-np; 1: a linear draft)")
    p_split: float = Field(0.1, ge=0.0, le=1.0, description="pipeinfer: a branch splits at a candidate whose draft "
                                                             "probability exceeds p_split + p_adjust (-ps)")

    @model_validator(mode="after")
    def _check_variant(self) -> StrategyConfig:
        allowed = STRATEGY_VARIANTS[self.name]
        if self.variant not in allowed:
            raise ValueError(f"strategy.variant={self.variant!r} is not a variant of {self.name!r} "
                             f"(one of: {', '.join(allowed)})")
        if self.n_parallel > 1 and self.name != "pipeinfer":
            raise ValueError(f"strategy.n_parallel={self.n_parallel}: token trees are drafted by pipeinfer only "
                             f"(not {self.name}); use 1")
        if self.name in CHAIN_STRATEGIES:
            reference = self.variant == "reference"
            if not reference and self.lookahead == 0:
                raise ValueError(f"strategy.lookahead=0 needs the reference variant ({self.name} "
                                 f"variant={self.variant!r} caps the run-ahead: lookahead >= 1)")
            if self.handshake is not None and not (reference and self.name == "pipespec"):
                raise ValueError(f"strategy.handshake={self.handshake} applies to pipespec's reference variant only "
                                 f"(not {self.name} variant={self.variant!r})")
        return self

    def chain_knobs(self) -> dict[str, Any]:
        """PipeSpec's knobs with the variant's defaults filled in (explicit fields win)."""
        reference = self.variant == "reference"
        lookahead, max_verify = ((0 if self.name == "pipespec" else 5), 100) if reference else (8, 16)
        knobs: dict[str, Any] = {
            "lookahead": lookahead if self.lookahead is None else self.lookahead,
            "max_verify": max_verify if self.max_verify is None else self.max_verify,
            "variant": self.variant}
        if reference and self.name == "pipespec":
            knobs["handshake"] = True if self.handshake is None else self.handshake
        return knobs

    def params(self) -> dict[str, Any]:
        """Constructor parameters of the selected strategy."""
        if self.name == "speculative":
            return {"gamma": self.gamma, "min_confidence": self.min_confidence}
        if self.name == "pipeinfer":
            return {"micro_batch": self.micro_batch, "min_confidence": self.min_confidence,
                    "max_runs_in_flight": self.max_runs_in_flight, "n_partitions": self.n_partitions,
                    "early_cancellation": self.early_cancellation, "variant": self.variant,
                    "run_pattern": self.pipeinfer_run_pattern, "head_priority": self.pipeinfer_head_priority,
                    "sync_prefill": self.pipeinfer_sync_prefill,
                    "cancelled_traffic": self.pipeinfer_cancelled_traffic, "kv_transactions": self.kv_transactions,
                    "p_recovery": self.p_recovery, "p_decay": self.p_decay, "n_parallel": self.n_parallel,
                    "p_split": self.p_split}
        if self.name in ("pipespec", "pipespec-sync"):
            return self.chain_knobs()
        if self.name == "speed":
            return {"exit_layer": self.exit_layer, "max_runs_in_flight": self.max_runs_in_flight,
                    "n_partitions": self.n_partitions, "early_cancellation": self.early_cancellation}
        return {}


class HeadConfig(_Strict):
    """Costs on the head node beyond its layers: sampling/verification and scheduling per returned run."""

    verify_overhead: Duration = Field(0.0, description="time to sample and verify one returned run")
    return_mode: Literal["logits", "topk", "ids"] = Field(
        "logits", description="what the last stage returns to the head: full logits, top-k, or greedy ids")
    top_k: int = Field(8, ge=1)


class Scenario(_Strict):
    """A whole scenario: models, cluster, network, placement, acceptance, workload, strategy."""

    name: str = "scenario"
    description: str = ""
    models: ModelsConfig
    cluster: ClusterConfig
    network: NetworkConfig
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    acceptance: AcceptanceConfig = Field(default_factory=AcceptanceConfig)
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        n = self.cluster.count
        split = self.placement.layer_split
        if split is not None and len(split) != n:
            raise ValueError(f"placement.layer_split has {len(split)} entries for {n} nodes")
        if split is not None and abs(sum(split) - 1.0) > 1e-3:  # rounded fractions are fine
            raise ValueError(f"placement.layer_split={split} sums to {sum(split):.6g}, not 1 "
                             "(fractions of the target's layers, one per node)")
        self._check_draft_node()
        n_layers = self.models.target_spec().n_layers
        n_stages = n if split is None else sum(1 for f in split if f > 0)
        if n_stages > n_layers:
            raise ValueError(f"cluster.count={n} is more stages than the target's {n_layers} layers")
        for override in self.cluster.overrides:
            if override.index >= n:
                raise ValueError(f"cluster.overrides index {override.index} is not a node (count={n})")
        for link in self.network.links:
            if any(i >= n for i in link.between):
                raise ValueError(f"network.links between {list(link.between)} names a node beyond count={n}")
        if self.strategy.name == "speed" and self.strategy.exit_layer >= n_layers:
            raise ValueError(f"strategy.exit_layer={self.strategy.exit_layer} is not a layer of the target "
                             f"({n_layers} layers)")
        exits = self.acceptance.exit_alphas
        if self.strategy.name == "speed" and exits and not min(exits) <= self.strategy.exit_layer <= max(exits):
            raise ValueError(f"strategy.exit_layer={self.strategy.exit_layer} lies outside acceptance.exit_alphas "
                             f"(layers {min(exits)}..{max(exits)})")
        if self.strategy.name in CHAIN_STRATEGIES:
            self._check_chain()
        if self.cluster.cost_model == "floor" and self.cluster.profile is None:
            if self.cluster.layer_floor is None:
                raise ValueError("cluster.cost_model=floor needs cluster.layer_floor or cluster.hardware")
        if self.strategy.name in ("speculative", "pipeinfer") and self.models.draft is None:
            raise ValueError(f"strategy.name={self.strategy.name!r} needs models.draft")
        if self.strategy.n_parallel > 1 and not self.acceptance.confidence:
            raise ValueError(f"strategy.n_parallel={self.strategy.n_parallel} needs acceptance.confidence=true "
                             "(a tree splits on the draft's probabilities)")
        if self.acceptance.model == "positional" and not self.acceptance.alphas:
            raise ValueError("acceptance.alphas must be given for acceptance.model=positional")
        if self.acceptance.model == "replay" and not self.acceptance.sequence:
            raise ValueError("acceptance.sequence must be given for acceptance.model=replay")
        return self


    def _check_draft_node(self) -> None:
        """``placement.draft_node`` is a node; only it may hold no target layers (a 0 in the split), never the
        head (node 0 samples and holds the first layers)."""
        n, draft_node, split = self.cluster.count, self.placement.draft_node, self.placement.layer_split
        if draft_node >= n:
            raise ValueError(f"placement.draft_node={draft_node} is not a node (cluster.count={n}: nodes 0..{n - 1})")
        for i, fraction in enumerate(split or []):
            if fraction == 0 and i == 0:
                raise ValueError("placement.layer_split[0]=0: the head (node 0) holds the first target layers")
            if fraction == 0 and i != draft_node:
                raise ValueError(f"placement.layer_split[{i}]=0: only the draft node (placement.draft_node="
                                 f"{draft_node}) may hold no target layers")

    def target_nodes(self) -> list[int]:
        """The nodes of the target's pipeline, in order (every node but a draft node given no layers)."""
        split = self.placement.layer_split
        return list(range(self.cluster.count)) if split is None else [i for i, f in enumerate(split) if f > 0]

    def acceptance_alpha(self) -> float:
        """The i.i.d. acceptance rate in effect: for ``speed`` with ``acceptance.exit_alphas``, the α of the exit
        layer (linear between the two nearest layers given); otherwise ``acceptance.alpha``."""
        table = self.acceptance.exit_alphas
        if self.strategy.name != "speed" or not table:
            return self.acceptance.alpha
        layer = self.strategy.exit_layer
        below = max(k for k in table if k <= layer)
        above = min(k for k in table if k >= layer)
        if below == above:
            return table[below]
        share = (layer - below) / (above - below)
        return table[below] + share * (table[above] - table[below])

    def _check_chain(self) -> None:
        if self.models.chain is None and self.models.draft is None:
            raise ValueError(f"strategy.name={self.strategy.name!r} needs models.chain or models.draft")
        n_models = len(self.models.chain_specs())
        groups = self.chain_node_groups()
        if len(groups) != n_models:
            raise ValueError(f"placement.chain_nodes has {len(groups)} groups for {n_models} models")
        used = [node for group in groups for node in group]
        if any(not group for group in groups) or len(set(used)) != len(used):
            raise ValueError(f"placement.chain_nodes={groups}: every model needs nodes of its own")
        if max(used) >= self.cluster.count:
            raise ValueError(f"placement.chain_nodes names node {max(used)} beyond cluster.count={self.cluster.count}")
        for spec, group in zip(self.models.chain_specs(), groups, strict=True):
            if len(group) > spec.n_layers:
                raise ValueError(f"{len(group)} nodes for {spec.name}, which has {spec.n_layers} layers")
        profiles = self.cluster.chain_profiles
        if profiles is not None and len(profiles) != n_models - 1:
            raise ValueError(f"cluster.chain_profiles has {len(profiles)} entries for {n_models - 1} draft models")
        alphas = self.acceptance.chain_alphas
        if alphas and len(alphas) != n_models - 1:
            raise ValueError(f"acceptance.chain_alphas has {len(alphas)} values for {n_models - 1} draft models")
        if any(b < a for a, b in zip(alphas, alphas[1:], strict=False)):
            raise ValueError(f"acceptance.chain_alphas={alphas} must not decrease towards the target")

    def chain_node_groups(self) -> list[list[int]]:
        """Nodes of each model of a PipeSpec chain (drafts first), defaulting to one node per draft."""
        if self.placement.chain_nodes is not None:
            return [list(group) for group in self.placement.chain_nodes]
        n_drafts = len(self.models.chain) if self.models.chain is not None else 1
        if self.cluster.count <= n_drafts:
            raise ValueError(f"cluster.count={self.cluster.count} leaves no node for the target after "
                             f"{n_drafts} draft models")
        return [[i] for i in range(n_drafts)] + [list(range(n_drafts, self.cluster.count))]

    def chain_alphas(self) -> list[float]:
        """Per draft model, the probability its token equals the target's."""
        if self.acceptance.chain_alphas:
            return list(self.acceptance.chain_alphas)
        k = len(self.models.chain_specs()) - 1
        return [self.acceptance.alpha ** ((k - i) / k) for i in range(k)]


# -- loading -----------------------------------------------------------------------------------------

def apply_overrides(document: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` assignments to a raw scenario document (values read as YAML)."""
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key.strip():
            raise ScenarioError(f"--set expects dotted.key=value, got {assignment!r}")
        try:
            value = parse_yaml(raw, f"--set {key.strip()}") if raw.strip() else None
        except YAMLFileError as error:
            raise ScenarioError(str(error)) from None
        node = document
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ScenarioError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return document


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that holds the field at ``loc`` (list indices skipped), or None."""
    import typing

    model: type[BaseModel] = Scenario
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        candidates += [arg for c in candidates for arg in typing.get_args(c)]
        found = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not found:
            return None
        model = found[0]
    return model


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    """' (did you mean `x`?)' for an unknown key close to a field of its section, else its known fields."""
    import difflib

    model = _section_model(loc)
    if model is None or not loc:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    if close:
        return f" (did you mean `{close[0]}`?)"
    return f" (known fields: {', '.join(model.model_fields)})"


def _format_validation_error(error: ValidationError, document: dict[str, Any]) -> str:
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            problems.append(f"{location}: missing required field")
        elif item["type"] == "extra_forbidden":
            problems.append(f"{location}={item.get('input')!r}: unknown field{_did_you_mean(tuple(item['loc']))}")
        elif location and isinstance(item.get("input"), dict):
            problems.append(f"{location}: {message}")
        elif location:
            problems.append(f"{location}={item.get('input')!r}: {message}")
        else:
            problems.append(message)
    return "; ".join(problems)


def scenario_from_dict(document: dict[str, Any]) -> Scenario:
    """Validate a raw document; errors become one ScenarioError line."""
    if not isinstance(document, dict):
        raise ScenarioError(f"a scenario must be a mapping, got {type(document).__name__}")
    try:
        return Scenario.model_validate(document)
    except ValidationError as error:
        raise ScenarioError(_format_validation_error(error, document)) from None


def load_scenario_document(path: str | Path) -> dict[str, Any]:
    """Read a scenario file as a raw mapping (errors name the file: missing, a folder, binary, bad YAML)."""
    path = Path(path)
    try:
        document = read_yaml(path, "scenario file")
    except YAMLFileError as error:
        raise ScenarioError(str(error)) from None
    if not isinstance(document, dict):
        kind = "empty" if document is None else f"a {type(document).__name__}"
        raise ScenarioError(f"{path}: a scenario must be a YAML mapping, this file is {kind}")
    if "axes" in document and "models" not in document:
        raise ScenarioError(f"{path}: this is a study (it has axes), not a scenario: run it with "
                            f"`pipesim sweep {path} --out DIR`, or give its base scenario")
    return document


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    """Load, override and validate a scenario file."""
    document = apply_overrides(load_scenario_document(path), overrides or [])
    try:
        scenario = scenario_from_dict(document)
    except ScenarioError as error:
        raise ScenarioError(f"{path}: {error}") from None
    profile = scenario.cluster.profile
    if profile is not None and not Path(profile).is_absolute() and not Path(profile).exists():
        beside = Path(path).parent / profile
        if beside.exists():
            scenario.cluster.profile = str(beside)
    if profile is not None and not Path(scenario.cluster.profile).exists():
        raise ScenarioError(f"{path}: cluster.profile={profile!r}: file not found")
    if scenario.cluster.chain_profiles:
        resolved = []
        for i, item in enumerate(scenario.cluster.chain_profiles):
            if item is not None and not Path(item).is_absolute() and not Path(item).exists():
                item = str(Path(path).parent / item) if (Path(path).parent / item).exists() else item
            if item is not None and not Path(item).exists():
                raise ScenarioError(f"{path}: cluster.chain_profiles[{i}]={item!r}: file not found")
            resolved.append(item)
        scenario.cluster.chain_profiles = resolved
    return scenario


# -- as the commands take them ------------------------------------------------------------------------

SET_HELP = ("override a scenario field, e.g. acceptance.alpha=0.5, network.bandwidth=100Mbit/s, "
            "network.latency=50us, workload.generate_tokens=256 (repeatable)")


def resolve_scenario_path(name: str | None) -> Path:
    """A scenario file path; ``None`` or ``default`` means the built-in default scenario."""
    if name is None or name == "default":
        return Path(str(resources.files("pipesim") / "data" / "default.yaml"))
    return Path(name)


def load_cli_scenario(name: str | None, sets: Sequence[str], strategy: str | None) -> Scenario:
    """A scenario as the commands take it: a path or ``default``, ``--set`` overrides, ``--strategy``."""
    overrides = list(sets)
    if strategy:
        overrides.append(f"strategy.name={strategy}")
    return load_scenario(resolve_scenario_path(name), overrides)
