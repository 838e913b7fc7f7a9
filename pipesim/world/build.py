"""The world of a scenario, built once: nodes, pipelines (layer ranges, cost models, payloads), the network,
acceptance, the token source, the verification overhead and the seeds.

The simulator, the executor's emulation and the closed forms all take their figures from here, so a scenario
means the same in each. A pipeline is one model's stages: the target's for the single-model strategies, one per
model of a PipeSpec chain (drafts first, the target last).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..models.catalog import ModelSpec
from ..placement import split_layers, target_stages
from ..scenario import CHAIN_STRATEGIES, Scenario
from .acceptance import AcceptanceModel, ConfidenceModel, OracleDraft, SyntheticTokens
from .costs import NodeProfile, Payloads, StageCost, make_cost_model, scenario_nodes
from .memory import check_memory_fit
from .network import Network
from .profile import HardwareProfile


class CostModel(Protocol):
    """What a stage and a draft cost on a node: the roofline and the calibrated model both implement it."""

    spec: ModelSpec

    def stage_cost(self, node: NodeProfile, n_layers: int, n_tokens: int, context: int,
                   n_outputs: int = 0) -> StageCost: ...

    def output_head_time(self, node: NodeProfile, n_outputs: int) -> float: ...

    def model_cost(self, node: NodeProfile, n_tokens: int, context: int) -> float: ...


@dataclass(frozen=True)
class Pipeline:
    """One model's stages: ``nodes[k]`` holds ``layer_ranges[k]`` of ``spec``; ``nodes[0]`` is its head.

    ``accuracy``: how often this model's token equals the target's (1.0 for the target itself); ``cost_source``
    says where its costs come from (``roofline``, ``floor`` or the profile's path).
    """

    level: int
    spec: ModelSpec
    nodes: tuple[int, ...]
    layer_ranges: tuple[tuple[int, int], ...]
    cost: CostModel
    payloads: Payloads
    accuracy: float = 1.0
    cost_source: str = "roofline"
    is_target: bool = True

    @property
    def n_stages(self) -> int:
        return len(self.nodes)


@dataclass
class World:
    """Everything the engines model about a scenario (see the module docstring)."""

    scenario: Scenario
    nodes: list[NodeProfile]
    pipelines: list[Pipeline]
    draft_cost: CostModel | None
    profile: HardwareProfile | None
    verify_overhead: float
    tokens: SyntheticTokens
    acceptance_seed: int
    host_of: list[str | None] = field(default_factory=list)
    concurrent_slowdown: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    draft_node: int = 0  # where the draft model runs (placement.draft_node); its cost uses that node's figures

    @property
    def remote_draft(self) -> bool:
        """The draft runs on a node other than the target's head: each draft step crosses their link."""
        return self.draft_cost is not None and self.draft_node != self.target.nodes[0]

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self.nodes]

    @property
    def target(self) -> Pipeline:
        return self.pipelines[-1]

    def acceptance(self, prompt_len: int | None = None) -> AcceptanceModel:
        """A fresh acceptance model (its draws are a function of the seed alone)."""
        scenario = self.scenario
        acc = scenario.acceptance
        prompt = scenario.workload.prompt_tokens if prompt_len is None else prompt_len
        confidence = ConfidenceModel(acc.confidence_right, acc.confidence_wrong, acc.confidence_second) if acc.confidence else None
        return AcceptanceModel(acc.model, scenario.acceptance_alpha(), acc.alphas, acc.sequence, prompt_len=prompt,
                               seed=self.acceptance_seed, p_after_accept=acc.p_after_accept,
                               p_after_reject=acc.p_after_reject, p_first=acc.p_first, confidence=confidence)

    def oracle_draft(self, acceptance: AcceptanceModel, tokens=None) -> OracleDraft:
        return OracleDraft(self.tokens if tokens is None else tokens, acceptance)

    def prompt(self) -> list[int]:
        """The synthetic prompt (the target's own continuation from position 0)."""
        return [self.tokens.token(p) for p in range(self.scenario.workload.prompt_tokens)]

    def network(self, measured_transport: bool = True) -> Network:
        """A fresh network (link queues empty); with the profile's measured MPI transport added to every link
        when ``measured_transport`` and ``network.profile_links: add`` (the executor's own links have it)."""
        scenario = self.scenario
        overrides = {frozenset(link.between): (link.bandwidth, link.latency) for link in scenario.network.links}
        transport = None
        if measured_transport and self.profile is not None and scenario.network.profile_links == "add":
            index = {name: i for i, name in enumerate(self.node_names)}
            transport = {}
            for key, link in self.profile.links.items():
                src, _, dst = key.partition("->")
                if src in index and dst in index:
                    transport[(index[src], index[dst])] = (link.latency, link.bandwidth)
        return Network(self.node_names, scenario.network.bandwidth, scenario.network.latency, overrides, transport)

    def kv_capacity(self, prompt_len: int | None = None) -> int:
        """KV cells of every stage's cache, as the executor sizes them: prompt + generated tokens + headroom."""
        workload = self.scenario.workload
        prompt = workload.prompt_tokens if prompt_len is None else prompt_len
        return prompt + workload.generate_tokens + self.scenario.executor.kv_headroom

    def cost_sources(self) -> list[str]:
        return [pipeline.cost_source for pipeline in self.pipelines]


def acceptance_seed(scenario: Scenario) -> int:
    """The seed of the acceptance draws: one formula for every engine."""
    return scenario.acceptance.seed + 7919 * scenario.workload.seed


def _cost(spec: ModelSpec, scenario: Scenario, profile: HardwareProfile | None, role: str) -> CostModel:
    return make_cost_model(spec, scenario, role, profile)


def _payloads(spec: ModelSpec, scenario: Scenario) -> Payloads:
    return Payloads(spec.d_model, spec.vocab_size, scenario.models.activation_bytes, scenario.head.return_mode,
                    scenario.head.top_k)


def _chain_pipelines(scenario: Scenario, target_profile: HardwareProfile | None,
                     target_profile_path: str | None) -> list[Pipeline]:
    specs = scenario.models.chain_specs()
    groups = scenario.chain_node_groups()
    accuracies = [*scenario.chain_alphas(), 1.0]
    paths: Sequence[str | None] = scenario.cluster.chain_profiles or [None] * (len(specs) - 1)
    pipelines = []
    for i, (spec, group) in enumerate(zip(specs, groups, strict=True)):
        is_target = i == len(specs) - 1
        path = target_profile_path if is_target else paths[i]
        profile = target_profile if is_target else (HardwareProfile.load(path) if path else None)
        pipelines.append(Pipeline(
            i, spec, tuple(group), tuple(split_layers(spec.n_layers, None, len(group))),
            _cost(spec, scenario, profile, "target"), _payloads(spec, scenario), accuracies[i],
            path or scenario.cluster.cost_model, is_target))
    return pipelines


def build_world(scenario: Scenario) -> World:
    """The world of ``scenario`` (loads its calibrated profiles, if any); a placement that does not fit a node's
    memory (where known: ``cluster.memory`` or ``cluster.hardware``) raises ``MemoryFitError``."""
    check_memory_fit(scenario)
    models, cluster = scenario.models, scenario.cluster
    target = models.target_spec()
    draft = models.draft_spec()
    profile = HardwareProfile.load(cluster.profile) if cluster.profile is not None else None
    nodes = scenario_nodes(scenario)
    if scenario.strategy.name in CHAIN_STRATEGIES:
        pipelines = _chain_pipelines(scenario, profile, cluster.profile)
        draft_cost = None
    else:
        stage_nodes, ranges = target_stages(target.n_layers, scenario.placement.layer_split, cluster.count)
        pipelines = [Pipeline(0, target, tuple(stage_nodes), tuple(ranges),
                              _cost(target, scenario, profile, "target"), _payloads(target, scenario), 1.0,
                              cluster.profile or cluster.cost_model)]
        draft_cost = _cost(draft, scenario, profile, "draft") if draft else None
    verify_overhead = scenario.head.verify_overhead or (profile.verify_overhead if profile is not None else 0.0)
    host_of: list[str | None] = [None] * len(nodes)
    slowdown = [1.0] * len(nodes)
    if profile is not None:
        for i, node in enumerate(nodes):
            coefficients = profile.nodes.get(node.name)
            if coefficients is not None:
                host_of[i], slowdown[i] = coefficients.host or None, coefficients.concurrent_slowdown
    warnings = []
    if profile is not None and len(pipelines) > 1:
        warnings = [f"level {p.level} ({p.spec.name}) keeps {p.cost_source} costs: cluster.profile is the target's; "
                    f"give its own in cluster.chain_profiles[{p.level}]" for p in pipelines[:-1]
                    if p.cost_source == cluster.cost_model]
    return World(scenario, nodes, pipelines, draft_cost, profile, verify_overhead,
                 SyntheticTokens(target.vocab_size, scenario.workload.seed), acceptance_seed(scenario), host_of,
                 slowdown, warnings, scenario.placement.draft_node if draft_cost is not None else 0)
