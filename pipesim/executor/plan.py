"""What one generation needs, derived from the scenario and the number of ranks, with every check done up front.

``make_plan`` is the pre-flight check: the ``pipesim run`` front end calls it before launching ``mpiexec``, and
every rank calls it again before loading anything, so bad input is one clear error line, never a half-started
job. It imports neither torch nor mpi4py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..placement import split_layers, target_stages
from ..scenario import Scenario
from .errors import ExecutorSetupError
from .modelref import ModelRef, resolve_model

EXECUTOR_STRATEGIES = ("iterative", "speculative", "pipeinfer", "speed", "pipespec", "pipespec-sync")
CHAIN_STRATEGIES = ("pipespec", "pipespec-sync")


@dataclass(frozen=True)
class LevelPlan:
    """One model of a PipeSpec chain: its ranks (the first is the level head) and their layers of its model."""

    index: int
    ranks: list[int]
    layer_ranges: list[tuple[int, int]]
    n_layers: int
    model: ModelRef | None  # real compute: the weights; None: emulated (cost of the chain spec)
    is_target: bool


@dataclass(frozen=True)
class Plan:
    """A scenario ready to execute on ``n_ranks`` ranks (rank k holds stage k)."""

    scenario: Scenario
    n_ranks: int
    node_names: list[str]
    layer_ranges: list[tuple[int, int]]
    target: ModelRef | None  # real compute: the target model
    draft: ModelRef | None  # the draft model (draft=model) or the oracle's cost stand-in (oracle_cost=model)
    max_seqs: int  # KV sequences per cache: the canonical one plus the partitions of pipeinfer
    early_exit: str | None = None  # speed: "real" or "oracle"
    levels: list[LevelPlan] | None = None  # pipespec: the chain, drafts first
    draft_rank: int | None = None  # the draft on a rank of its own (placement.draft_node with no target layers)

    @property
    def executor(self):
        return self.scenario.executor

    @property
    def real(self) -> bool:
        return self.scenario.executor.compute == "real"

    @property
    def uses_draft(self) -> bool:
        return self.scenario.strategy.name in ("speculative", "pipeinfer")

    @property
    def oracle(self) -> bool:
        """The head needs the target's reference continuation (oracle drafts or oracle early exits)."""
        if self.levels is not None:
            return self.scenario.executor.draft == "oracle"
        if self.early_exit is not None:
            return self.early_exit == "oracle"
        return self.uses_draft and self.scenario.executor.draft == "oracle"

    @property
    def chain(self) -> bool:
        return self.levels is not None

    @property
    def pipelines(self) -> list[LevelPlan]:
        """One pipeline per model: a chain's levels, or the target over every rank."""
        if self.levels is not None:
            return self.levels
        ranks = [rank for rank in range(self.n_ranks) if rank != self.draft_rank]
        return [LevelPlan(0, ranks, [self.layer_ranges[rank] for rank in ranks], self.layer_ranges[ranks[-1]][1],
                          self.target, True)]

    def level_of(self, rank: int) -> LevelPlan:
        """The pipeline (chain level) that rank ``rank`` belongs to."""
        return next(level for level in self.pipelines if rank in level.ranks)


def make_plan(scenario: Scenario, n_ranks: int) -> Plan:
    """Check that the scenario can run on ``n_ranks`` ranks and resolve its models (ExecutorSetupError if not)."""
    ex = scenario.executor
    count = scenario.cluster.count
    if scenario.strategy.name in CHAIN_STRATEGIES:
        return _chain_plan(scenario, n_ranks)
    if scenario.strategy.name not in EXECUTOR_STRATEGIES:
        raise ExecutorSetupError(f"strategy.name={scenario.strategy.name!r} is not supported by the executor "
                                 f"(it runs {', '.join(EXECUTOR_STRATEGIES)}; use `pipesim simulate` for it)")
    if n_ranks != count:
        raise ExecutorSetupError(f"{n_ranks} ranks do not match cluster.count={count} of scenario "
                                 f"{scenario.name!r} (one rank per node: use --ranks {count} or "
                                 f"--set cluster.count={n_ranks})")
    if ex.fault_rank is not None and ex.fault_rank >= n_ranks:
        raise ExecutorSetupError(f"executor.fault_rank={ex.fault_rank} is not a rank (ranks 0..{n_ranks - 1})")
    target = draft = None
    if scenario.strategy.n_parallel > 1 and ex.compute == "real":
        raise ExecutorSetupError(f"strategy.n_parallel={scenario.strategy.n_parallel}: token trees run in the "
                                 "executor with executor.compute=emulated only (the torch stages give all tokens "
                                 "of a run the same sequence ids: no tree attention mask)")
    if ex.compute == "real":
        target = resolve_model(ex.model, "executor.model", ex.seed)
        n_layers = target.n_layers
        if ex.prompt is not None and not target.has_tokenizer:
            raise ExecutorSetupError(f"executor.prompt is set but executor.model={ex.model!r} has no tokenizer "
                                     "(use a GGUF model, or leave the prompt unset for synthetic prompt tokens)")
        if ex.chat and not target.has_chat_template:
            raise ExecutorSetupError(f"executor.chat=true but executor.model={ex.model!r} has no chat template")
    else:
        n_layers = scenario.models.target_spec().n_layers
        if ex.draft == "model" or ex.oracle_cost == "model":
            field = "executor.draft=model" if ex.draft == "model" else "executor.oracle_cost=model"
            raise ExecutorSetupError(f"{field} runs a real draft model: it needs executor.compute=real")
    if ex.chat and ex.prompt is None:
        raise ExecutorSetupError("executor.chat=true needs executor.prompt")
    needs_draft_model = ex.draft == "model" or ex.oracle_cost == "model"
    if needs_draft_model and scenario.strategy.name in ("speculative", "pipeinfer"):
        if ex.draft_model is None:
            field = "executor.draft=model" if ex.draft == "model" else "executor.oracle_cost=model"
            raise ExecutorSetupError(f"{field} needs executor.draft_model (e.g. tiny-llama@1 or a .gguf path)")
        draft = resolve_model(ex.draft_model, "executor.draft_model", ex.seed + 1)
        if ex.draft == "model" and target is not None and draft.vocab_size != target.vocab_size:
            raise ExecutorSetupError(f"executor.draft_model={ex.draft_model!r} has a vocabulary of "
                                     f"{draft.vocab_size} tokens, the target {target.vocab_size}")
    draft_rank = _draft_rank(scenario)
    n_stages = n_ranks - (draft_rank is not None)
    if n_stages > n_layers:
        what = f"executor.model={ex.model!r}" if target is not None else f"models.target={scenario.models.target!r}"
        raise ExecutorSetupError(f"{n_stages} ranks is more pipeline stages than the {n_layers} layers of {what}")
    try:
        stage_ranks, ranges = target_stages(n_layers, scenario.placement.layer_split, count)
    except ValueError as error:
        raise ExecutorSetupError(f"placement.layer_split={scenario.placement.layer_split}: {error}") from None
    layer_ranges = [(0, 0)] * n_ranks
    for rank, span in zip(stage_ranks, ranges, strict=True):
        layer_ranges[rank] = span
    pooled = scenario.strategy.name in ("pipeinfer", "speed")
    max_seqs = scenario.strategy.n_partitions * scenario.strategy.n_parallel + 1 if pooled else 1  # trees: n_parallel ids each
    if scenario.strategy.name == "pipeinfer" and relays_kv_transactions(scenario):
        # reference_kv_transaction_ops touches sequence max_seq = n_partitions * n_parallel + 1, as the code does
        max_seqs = scenario.strategy.n_partitions * scenario.strategy.n_parallel + 2
    early_exit = _early_exit_mode(scenario, target, n_layers) if scenario.strategy.name == "speed" else None
    return Plan(scenario, n_ranks, [f"n{i}" for i in range(n_ranks)], layer_ranges, target, draft, max_seqs,
                early_exit, draft_rank=draft_rank)


def relays_kv_transactions(scenario: Scenario) -> bool:
    """PipeInfer with the reference's KV transactions (``strategy.kv_transactions``, else its variant's) sent as
    messages (``executor.kv_transactions=messages``)."""
    from ..scheduling.strategies.pipeinfer import resolve_switches

    if scenario.strategy.name != "pipeinfer" or scenario.executor.kv_transactions != "messages":
        return False
    try:
        switches = resolve_switches(scenario.strategy.variant, kv_transactions=scenario.strategy.kv_transactions)
    except ValueError:
        return False
    return switches["kv_transactions"] == "reference"


def _draft_rank(scenario: Scenario) -> int | None:
    """The rank of a draft on a node of its own: ``placement.draft_node`` when it holds no target layers."""
    node, split = scenario.placement.draft_node, scenario.placement.layer_split
    if node == 0:
        return None
    if split is not None and split[node] == 0:
        return node
    if scenario.strategy.name in ("speculative", "pipeinfer"):
        raise ExecutorSetupError(f"placement.draft_node={node}: the executor runs a draft off the head on a rank "
                                 f"of its own, with no target layers (give node {node} a 0 in placement.layer_split)")
    return None


def _check_common(scenario: Scenario, n_ranks: int) -> None:
    ex, count = scenario.executor, scenario.cluster.count
    if n_ranks != count:
        raise ExecutorSetupError(f"{n_ranks} ranks do not match cluster.count={count} of scenario "
                                 f"{scenario.name!r} (one rank per node: use --ranks {count} or "
                                 f"--set cluster.count={n_ranks})")
    if ex.fault_rank is not None and ex.fault_rank >= n_ranks:
        raise ExecutorSetupError(f"executor.fault_rank={ex.fault_rank} is not a rank (ranks 0..{n_ranks - 1})")
    if ex.chat and ex.prompt is None:
        raise ExecutorSetupError("executor.chat=true needs executor.prompt")


def _early_exit_mode(scenario: Scenario, target: ModelRef | None, n_layers: int) -> str:
    """speed: where early predictions come from (``executor.early_exit`` or its default), checked."""
    ex = scenario.executor
    exit_layer = scenario.strategy.exit_layer
    if exit_layer >= n_layers:
        raise ExecutorSetupError(f"strategy.exit_layer={exit_layer} is not a layer of executor.model={ex.model!r} "
                                 f"({n_layers} layers)")
    mode = ex.early_exit or ("real" if target is not None and target.kind == "gguf" else "oracle")
    if mode == "real" and target is None:
        raise ExecutorSetupError("executor.early_exit=real runs the model's own head: it needs executor.compute=real")
    if ex.exit_adapter is not None:
        if mode != "real":
            raise ExecutorSetupError(f"executor.exit_adapter={ex.exit_adapter!r} needs executor.early_exit=real")
        if ex.exit_adapter == "shipped":
            _check_shipped_adapter(exit_layer + 1, target)
        elif not Path(ex.exit_adapter).expanduser().is_file():
            raise ExecutorSetupError(f"executor.exit_adapter={ex.exit_adapter!r}: file not found "
                                     "(a path to an ExitAdapter file, or 'shipped')")
    return mode


def _check_shipped_adapter(layers: int, target: ModelRef | None) -> None:
    """executor.exit_adapter=shipped: an adapter ships for this model and exit layer (read without torch; the
    adapter module counts layers, so the state after layer ``k`` is its exit layer ``k + 1``)."""
    table_path = Path(str(resources.files("pipesim"))) / "data" / "exit_adapters" / "acceptance.json"
    model = "smollm2" if target is not None and "smollm2" in target.text.lower() else None
    try:
        table = json.loads(table_path.read_text())
    except (OSError, ValueError):
        table = {}
    shipped = table.get(model, {}).get("layers", {}) if model else {}
    if str(layers) not in shipped:
        have = ", ".join(str(int(k) - 1) for k in sorted(shipped, key=int)) or "none"
        raise ExecutorSetupError(f"executor.exit_adapter=shipped: no adapter ships for strategy.exit_layer="
                                 f"{layers - 1} of executor.model={target.text if target else None!r} "
                                 f"(shipped exit layers: {have})")


def _chain_plan(scenario: Scenario, n_ranks: int) -> Plan:
    """A PipeSpec chain: one level per model of ``models.chain`` (drafts first), each over its group of ranks."""
    ex = scenario.executor
    _check_common(scenario, n_ranks)
    groups = scenario.chain_node_groups()
    used = sorted(rank for group in groups for rank in group)
    if used != list(range(n_ranks)):
        raise ExecutorSetupError(f"placement.chain_nodes={groups} must use every rank 0..{n_ranks - 1} once "
                                 "(the executor runs one rank per node)")
    specs = scenario.models.chain_specs()
    n_drafts = len(specs) - 1
    refs: list[ModelRef | None] = [None] * len(specs)
    if ex.compute == "real":
        refs[-1] = resolve_model(ex.model, "executor.model", ex.seed)
        if ex.prompt is not None and not refs[-1].has_tokenizer:
            raise ExecutorSetupError(f"executor.prompt is set but executor.model={ex.model!r} has no tokenizer "
                                     "(use a GGUF model, or leave the prompt unset for synthetic prompt tokens)")
        if ex.chat and not refs[-1].has_chat_template:
            raise ExecutorSetupError(f"executor.chat=true but executor.model={ex.model!r} has no chat template")
        if ex.chain_models is not None:
            if len(ex.chain_models) != n_drafts:
                raise ExecutorSetupError(f"executor.chain_models has {len(ex.chain_models)} models for the "
                                         f"{n_drafts} draft models of models.chain")
            for i, text in enumerate(ex.chain_models):
                ref = resolve_model(text, f"executor.chain_models[{i}]", ex.seed + 1 + i)
                if ref.vocab_size != refs[-1].vocab_size:
                    raise ExecutorSetupError(f"executor.chain_models[{i}]={text!r} has a vocabulary of "
                                             f"{ref.vocab_size} tokens, the target {refs[-1].vocab_size}")
                refs[i] = ref
        elif ex.draft == "model":
            raise ExecutorSetupError("executor.draft=model with a PipeSpec chain needs executor.chain_models "
                                     "(e.g. [tiny-llama@1, tiny-llama@2], one per model of models.chain)")
    elif ex.draft == "model" or ex.chain_models is not None:
        field = "executor.draft=model" if ex.draft == "model" else "executor.chain_models"
        raise ExecutorSetupError(f"{field} runs real draft models: it needs executor.compute=real")
    levels, layer_ranges = [], [(0, 0)] * n_ranks
    for i, (spec, group, ref) in enumerate(zip(specs, groups, refs, strict=True)):
        n_layers = ref.n_layers if ref is not None else spec.n_layers
        if len(group) > n_layers:
            name = ref.text if ref is not None else spec.name
            raise ExecutorSetupError(f"placement.chain_nodes[{i}]={group}: {len(group)} ranks is more pipeline "
                                     f"stages than the {n_layers} layers of {name!r}")
        ranges = split_layers(n_layers, None, len(group))
        for rank, span in zip(group, ranges, strict=True):
            layer_ranges[rank] = span
        levels.append(LevelPlan(i, list(group), ranges, n_layers, ref, i == n_drafts))
    return Plan(scenario, n_ranks, [f"n{i}" for i in range(n_ranks)], layer_ranges, refs[-1], None, 1,
                None, levels)
