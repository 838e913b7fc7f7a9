"""Scenarios: validated descriptions of a cluster, a model pair, a workload and a strategy.

A scenario is written in YAML; ``load_scenario`` applies ``--set dotted.key=value`` overrides to the raw
document, validates it, and turns every problem into one ``ScenarioError`` line naming the field and value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .executor_config import ExecutorConfig
from .models.catalog import QUANTIZATION_BITS, ModelSpec, get_model_spec
from .strict import StrictModel
from .units import parse_bandwidth, parse_duration, parse_rate
from .yamlio import YAMLFileError, parse_yaml, read_yaml

Bandwidth = Annotated[float, BeforeValidator(parse_bandwidth), Field(gt=0, description="bytes/s or e.g. 1Gbit/s")]
Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0, description="seconds or e.g. 50us")]
FlopRate = Annotated[float, BeforeValidator(parse_rate), Field(gt=0, description="FLOP/s or e.g. 400G")]
STRATEGY_NAMES = ("iterative", "speculative", "pipeinfer", "speed", "pipespec", "pipespec-sync")
CHAIN_STRATEGIES = ("pipespec", "pipespec-sync")


class ScenarioError(ValueError):
    """A scenario that cannot be used; the message is one line naming the field and the value."""


class _Strict(StrictModel):
    """A scenario section (see ``StrictModel``: no extra fields, finite numbers, no booleans as numbers)."""


class ModelsConfig(_Strict):
    """Target and draft models (names from the catalog) and how they are stored."""

    target: str = Field(description="target model name from the catalog, e.g. llama-2-70b")
    target_quantization: str | None = Field(None, description="weight quantization, e.g. q3_k_m (default f16)")
    draft: str | None = Field(None, description="draft model name from the catalog, e.g. tinyllama-1.1b")
    draft_quantization: str | None = None
    chain: list[str] | None = Field(
        None, description="PipeSpec: draft models smallest first, 'name' or 'name:quantization' (default: [draft])")
    kv_bytes: float = Field(2.0, gt=0, description="bytes per KV-cache element (f16: 2)")
    activation_bytes: float = Field(4.0, gt=0, description="bytes per activation element sent between stages")

    @field_validator("target", "draft")
    @classmethod
    def _known_model(cls, name: str | None) -> str | None:
        if name is not None:
            get_model_spec(name)
        return name

    @field_validator("target_quantization", "draft_quantization")
    @classmethod
    def _known_quantization(cls, name: str | None) -> str | None:
        if name is not None and name.lower() not in QUANTIZATION_BITS:
            raise ValueError(f"unknown quantization (known: {', '.join(sorted(QUANTIZATION_BITS))})")
        return name

    def target_spec(self) -> ModelSpec:
        spec = get_model_spec(self.target)
        return spec.quantized(self.target_quantization) if self.target_quantization else spec

    @field_validator("chain")
    @classmethod
    def _known_chain(cls, names: list[str] | None) -> list[str] | None:
        for item in names or []:
            name, _, quantization = item.partition(":")
            get_model_spec(name)
            if quantization and quantization.lower() not in QUANTIZATION_BITS:
                raise ValueError(f"unknown quantization {quantization!r} in {item!r}")
        return names

    def chain_specs(self) -> list[ModelSpec]:
        """PipeSpec's models, smallest draft first and the target last."""
        specs = []
        for item in self.chain if self.chain is not None else [f"{self.draft}:{self.draft_quantization or ''}"]:
            name, _, quantization = item.partition(":")
            spec = get_model_spec(name)
            specs.append(spec.quantized(quantization) if quantization else spec)
        return [*specs, self.target_spec()]

    def draft_spec(self) -> ModelSpec | None:
        if self.draft is None:
            return None
        spec = get_model_spec(self.draft)
        return spec.quantized(self.draft_quantization) if self.draft_quantization else spec


class NodeOverride(_Strict):
    """Per-node changes for heterogeneous clusters."""

    index: int = Field(ge=0)
    flops: FlopRate | None = None
    memory_bandwidth: Bandwidth | None = None
    overhead_per_run: Duration | None = None


class ClusterConfig(_Strict):
    """Nodes of the cluster: a template applied to ``count`` nodes, with optional per-node overrides."""

    count: int = Field(ge=1, le=4096, description="number of nodes")
    flops: FlopRate = Field(description="effective compute throughput of one node")
    memory_bandwidth: Bandwidth = Field(description="effective memory bandwidth of one node")
    overhead_per_run: Duration = Field(0.0, description="fixed time a node spends per run it evaluates")
    overrides: list[NodeOverride] = Field(default_factory=list)
    profile: str | None = Field(
        None, description="hardware profile from `pipesim calibrate` (fitted costs replace the roofline; "
                          "a relative path is looked up from the scenario file's folder too)")


class LinkOverride(_Strict):
    """Per-link changes: the link between two node indices (both directions)."""

    between: tuple[int, int]
    bandwidth: Bandwidth | None = None
    latency: Duration | None = None


class NetworkConfig(_Strict):
    """Interconnect: every link has this latency and bandwidth unless overridden."""

    bandwidth: Bandwidth = Field(description="link bandwidth, e.g. 1Gbit/s")
    latency: Duration = Field(0.0, description="one-way message latency, e.g. 50us")
    links: list[LinkOverride] = Field(default_factory=list)
    profile_links: Literal["add", "ignore"] = Field(
        "add", description="with cluster.profile: add the profile's measured MPI transport (latency, copies) to "
                           "every link, or ignore it")


class PlacementConfig(_Strict):
    """Where the target layers and the draft model live."""

    layer_split: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="fraction of the target's layers on each node, in pipeline order (default: even)")
    draft_node: int = Field(0, ge=0, description="node running the draft model (the head, node 0, for now)")
    chain_nodes: list[list[Annotated[int, Field(ge=0)]]] | None = Field(
        None, description="PipeSpec: node indices of each model of the chain, drafts first, target last "
                          "(default: one node per draft, the rest for the target)")


class AcceptanceConfig(_Strict):
    """How often drafted tokens match the target (simulator and oracle drafts)."""

    model: Literal["iid", "positional", "replay"] = "iid"
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
    seed: int = 0


class WorkloadConfig(_Strict):
    """The request: prompt length and number of tokens to generate."""

    prompt_tokens: int = Field(32, ge=1, le=1_000_000)
    generate_tokens: int = Field(64, ge=1, le=10_000_000)
    seed: int = 0


class StrategyConfig(_Strict):
    """Which strategy runs, and its knobs (each strategy reads the ones it has)."""

    name: Literal["iterative", "speculative", "pipeinfer", "speed", "pipespec", "pipespec-sync"] = "pipeinfer"
    gamma: int = Field(4, ge=1, le=64, description="speculative: drafted tokens per verification")
    micro_batch: int = Field(3, ge=1, le=64, description="pipeinfer: drafted tokens per speculative run")
    min_confidence: float = Field(0.1, ge=0.0, le=1.0, description="draft confidence cut-off")
    max_runs_in_flight: int | None = Field(None, ge=1, description="pipeinfer: bound on valid runs in flight")
    n_partitions: int = Field(1000, ge=1, description="pipeinfer: KV partitions in the pool")
    early_cancellation: bool = Field(True, description="pipeinfer/speed: cancel invalidated runs")
    exit_layer: int = Field(8, ge=0, description="speed: layer whose hidden state predicts the next token")
    lookahead: int = Field(8, ge=1, le=256, description="pipespec: tokens a model may run ahead of the next one")
    max_verify: int = Field(16, ge=1, le=256, description="pipespec: most candidates verified in one run")

    def params(self) -> dict[str, Any]:
        """Constructor parameters of the selected strategy."""
        if self.name == "speculative":
            return {"gamma": self.gamma, "min_confidence": self.min_confidence}
        if self.name == "pipeinfer":
            return {"micro_batch": self.micro_batch, "min_confidence": self.min_confidence,
                    "max_runs_in_flight": self.max_runs_in_flight, "n_partitions": self.n_partitions,
                    "early_cancellation": self.early_cancellation}
        if self.name in ("pipespec", "pipespec-sync"):
            return {"lookahead": self.lookahead, "max_verify": self.max_verify,
                    "synchronous": self.name == "pipespec-sync"}
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
        n_layers = self.models.target_spec().n_layers
        if n > n_layers:
            raise ValueError(f"cluster.count={n} is more stages than the target's {n_layers} layers")
        if self.placement.draft_node != 0:
            raise ValueError(f"placement.draft_node={self.placement.draft_node}: only the head (0) is supported")
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
        if self.strategy.name in ("speculative", "pipeinfer") and self.models.draft is None:
            raise ValueError(f"strategy.name={self.strategy.name!r} needs models.draft")
        if self.acceptance.model == "positional" and not self.acceptance.alphas:
            raise ValueError("acceptance.alphas must be given for acceptance.model=positional")
        if self.acceptance.model == "replay" and not self.acceptance.sequence:
            raise ValueError("acceptance.sequence must be given for acceptance.model=replay")
        return self


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


def _format_validation_error(error: ValidationError, document: dict[str, Any]) -> str:
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            problems.append(f"{location}: missing required field")
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
    return scenario
