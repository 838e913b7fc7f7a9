"""Closed forms for iterative and synchronous speculative pipelines, on the world the simulator is built from.

Both use the costs of ``pipesim.world.build_world`` (the cost model, the payloads, the network's unloaded
transfer times, the node profiles and the layer split), so a difference from the simulation is a difference of
dynamics (queueing,
draft catch-up batches, sampling of acceptances, the truncated last verification), never of costs.

- iterative: one run in flight, so the time per token is exactly the sum of stage times and unloaded link
  times of a single-token run, summed over the growing context;
- speculative: each iteration drafts γ tokens on the draft's node (the head by default; elsewhere it adds the
  request to the draft node and the last step's reply), then sends γ+1 tokens through the pipeline once and
  commits on average (1-α^(γ+1))/(1-α) tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..scenario import Scenario
from ..world.build import World, build_world
from ..world.draft_exchange import reply_bytes, request_bytes


def expected_tokens_per_verification(alpha: float, gamma: int) -> float:
    """E[tokens committed by one verification of γ drafted tokens] with i.i.d. acceptance α."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


@dataclass
class PipelineCosts:
    """Unloaded costs of a scenario's (target) pipeline, from its world."""

    world: World

    @classmethod
    def of(cls, scenario: Scenario) -> PipelineCosts:
        return cls(build_world(scenario))

    @property
    def scenario(self) -> Scenario:
        return self.world.scenario

    def pass_time(self, n_tokens: int, context: int, n_outputs: int, n_kv_ops: int = 0) -> float:
        """One run through every stage and back to the head, with no other run in the way."""
        world = self.world
        pipeline = world.target
        network = world.network()
        nodes = pipeline.nodes
        n_stages = len(nodes)
        total = 0.0
        for i, (node, (start, end)) in enumerate(zip(nodes, pipeline.layer_ranges, strict=True)):
            last = i == n_stages - 1
            total += pipeline.cost.stage_cost(world.nodes[node], end - start, n_tokens, context,
                                              n_outputs if last else 0).total
            if not last:
                total += network.transfer_time(node, nodes[i + 1], pipeline.payloads.activations(n_tokens, n_kv_ops))
        if n_stages > 1:
            total += network.transfer_time(nodes[-1], nodes[0], pipeline.payloads.predictions(n_outputs))
        return total + world.verify_overhead

    def draft_step(self, n_tokens: int, context: int) -> float:
        """One draft-model step on the draft's node (the head unless ``placement.draft_node`` says otherwise)."""
        world = self.world
        if world.draft_cost is None:
            return 0.0
        return world.draft_cost.model_cost(world.nodes[world.draft_node], n_tokens, context)

    def draft_exchange(self, n_new_tokens: float) -> float:
        """A draft on a node of its own: the head's request (with ``n_new_tokens`` token ids) and the last
        step's reply, unloaded (the draft's steps run back to back; world/draft_exchange.py); 0 on the head."""
        world = self.world
        if not world.remote_draft:
            return 0.0
        network, head, node = world.network(), world.target.nodes[0], world.draft_node
        return (network.transfer_time(head, node, request_bytes(n_new_tokens))
                + network.transfer_time(node, head, reply_bytes()))

    def ttft(self) -> float:
        """Time to first token: the prompt's prefill pass (its last token's prediction returns)."""
        return self.pass_time(self.scenario.workload.prompt_tokens, 0, 1)

    def iterative_tokens_per_s(self) -> float | None:
        """Decode rate of iterative decoding: (G-1) tokens over the sum of single-token pass times."""
        workload = self.scenario.workload
        p, g = workload.prompt_tokens, workload.generate_tokens
        if g < 2:
            return None
        total = sum(self.pass_time(1, p + k - 1, 1) for k in range(1, g))
        return (g - 1) / total

    def speculative_iteration_time(self, gamma: int, context: int, tokens_per_verification: float = 1.0) -> float:
        """γ single-token draft steps, then one verification pass of γ+1 tokens (a draft on its own node: plus
        its exchange, whose request carries the committed tokens the draft was not fed: 1 + max(0, E - γ))."""
        n_new = 1.0 + max(0.0, tokens_per_verification - gamma)
        return (gamma * self.draft_step(1, context) + self.draft_exchange(n_new)
                + self.pass_time(gamma + 1, context, gamma + 1))

    def speculative_tokens_per_s(self, alpha: float | None = None, gamma: int | None = None) -> float | None:
        """Decode rate of synchronous speculation at mid-generation context (α, γ default to the scenario's)."""
        scenario = self.scenario
        if scenario.models.draft is None:
            return None
        alpha = scenario.acceptance.alpha if alpha is None else alpha
        gamma = scenario.strategy.gamma if gamma is None else gamma
        workload = scenario.workload
        context = workload.prompt_tokens + workload.generate_tokens // 2
        tokens = expected_tokens_per_verification(alpha, gamma)
        return tokens / self.speculative_iteration_time(gamma, context, tokens)


def analytic_columns(scenario: Scenario, realized_alpha: float | None = None) -> dict[str, float | None]:
    """The closed-form columns of one point: TTFT and, for iterative/speculative, tokens/s.

    ``analytic_tokens_per_s`` uses the scenario's nominal α; ``analytic_tokens_per_s_realized`` uses the
    acceptance rate the simulation actually drew, which separates sampling noise from the model's dynamics.
    """
    costs = PipelineCosts.of(scenario)
    name = scenario.strategy.name
    columns: dict[str, float | None] = {"analytic_ttft_s": costs.ttft(), "analytic_tokens_per_s": None,
                                        "analytic_tokens_per_s_realized": None}
    if name == "iterative":
        rate = costs.iterative_tokens_per_s()
        columns["analytic_tokens_per_s"] = columns["analytic_tokens_per_s_realized"] = rate
    elif name == "speculative" and scenario.acceptance.model == "iid":
        columns["analytic_tokens_per_s"] = costs.speculative_tokens_per_s()
        if realized_alpha is not None and math.isfinite(realized_alpha):
            columns["analytic_tokens_per_s_realized"] = costs.speculative_tokens_per_s(alpha=realized_alpha)
    return columns
