"""What one generation needs, derived from the scenario and the number of ranks, with every check done up front.

``make_plan`` is the pre-flight check: the ``pipesim run`` front end calls it before launching ``mpiexec``, and
every rank calls it again before loading anything, so bad input is one clear error line, never a half-started
job. It imports neither torch nor mpi4py.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..placement import split_layers
from ..scenario import Scenario
from .errors import ExecutorSetupError
from .modelref import ModelRef, resolve_model

EXECUTOR_STRATEGIES = ("iterative", "speculative", "pipeinfer")


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

    @property
    def executor(self):
        return self.scenario.executor

    @property
    def real(self) -> bool:
        return self.scenario.executor.compute == "real"

    @property
    def uses_draft(self) -> bool:
        return self.scenario.strategy.name != "iterative"

    @property
    def oracle(self) -> bool:
        return self.uses_draft and self.scenario.executor.draft == "oracle"


def make_plan(scenario: Scenario, n_ranks: int) -> Plan:
    """Check that the scenario can run on ``n_ranks`` ranks and resolve its models (ExecutorSetupError if not)."""
    ex = scenario.executor
    count = scenario.cluster.count
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
    if needs_draft_model and scenario.strategy.name != "iterative":
        if ex.draft_model is None:
            field = "executor.draft=model" if ex.draft == "model" else "executor.oracle_cost=model"
            raise ExecutorSetupError(f"{field} needs executor.draft_model (e.g. tiny-llama@1 or a .gguf path)")
        draft = resolve_model(ex.draft_model, "executor.draft_model", ex.seed + 1)
        if ex.draft == "model" and target is not None and draft.vocab_size != target.vocab_size:
            raise ExecutorSetupError(f"executor.draft_model={ex.draft_model!r} has a vocabulary of "
                                     f"{draft.vocab_size} tokens, the target {target.vocab_size}")
    if n_ranks > n_layers:
        what = f"executor.model={ex.model!r}" if target is not None else f"models.target={scenario.models.target!r}"
        raise ExecutorSetupError(f"{n_ranks} ranks is more pipeline stages than the {n_layers} layers of {what}")
    try:
        layer_ranges = split_layers(n_layers, scenario.placement.layer_split, count)
    except ValueError as error:
        raise ExecutorSetupError(f"placement.layer_split={scenario.placement.layer_split}: {error}") from None
    max_seqs = scenario.strategy.n_partitions + 1 if scenario.strategy.name == "pipeinfer" else 1
    return Plan(scenario, n_ranks, [f"n{i}" for i in range(n_ranks)], layer_ranges, target, draft, max_seqs)
