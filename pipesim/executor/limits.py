"""Sizes checked before any work: a generation whose memory cannot fit on this machine is refused in one line.

The estimate is of what grows with the generation, per rank: the KV cache (``prompt + generate_tokens +
executor.kv_headroom`` cells, keys and values in float32 for the rank's layers, plus one flag per cell and KV
sequence: ``strategy.n_partitions + 1`` sequences for PipeInfer and SPEED), the head's reference continuation
and real draft model, and the trace records (a conservative ``RECORD_BYTES_PER_TOKEN`` per token and rank; the
head gathers every rank's). Model weights are not counted. Emulated compute holds no KV tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..limits import REFUSE_SHARE, gb, machine_memory
from .errors import ExecutorSetupError
from .plan import Plan

KV_ELEMENT_BYTES = 4  # the executor's caches are float32
CELL_BOOKKEEPING_BYTES = 8 + 4  # position (int64) and sequence count (int32) per cell
RECORD_BYTES_PER_TOKEN = 4096  # trace records a rank keeps per generated token (about 10 records of ~300 B)


def _prompt_tokens(plan: Plan) -> int:
    prompt = plan.executor.prompt
    if plan.real and prompt is not None:  # byte-level BPE: at most a token per byte, plus a chat template
        return len(prompt.encode()) + 256
    return plan.scenario.workload.prompt_tokens


def _kv_bytes(layers: int, cells: int, kv_dim: int, max_seqs: int) -> int:
    return 2 * layers * cells * kv_dim * KV_ELEMENT_BYTES + cells * (max_seqs + CELL_BOOKKEEPING_BYTES)


def rank_bytes(plan: Plan) -> list[int]:
    """Estimated bytes each rank holds for this generation (beyond its model weights)."""
    scenario, ex = plan.scenario, plan.executor
    generate = scenario.workload.generate_tokens
    capacity = _prompt_tokens(plan) + generate + ex.kv_headroom
    records = generate * RECORD_BYTES_PER_TOKEN
    sizes = []
    for rank in range(plan.n_ranks):
        start, end = plan.layer_ranges[rank]
        ref = plan.target
        if plan.levels is not None:
            ref = plan.level_of(rank).model
        kv = _kv_bytes(end - start, capacity, ref.kv_dim, plan.max_seqs) if plan.real and ref is not None else 0
        sizes.append(kv + records)
    sizes[0] += records * (plan.n_ranks - 1)  # the head gathers every rank's records
    if plan.real and plan.target is not None and plan.oracle:  # the reference continuation (whole model)
        sizes[0] += _kv_bytes(plan.target.n_layers, _prompt_tokens(plan) + generate + 64, plan.target.kv_dim, 1)
    if plan.real and plan.draft is not None:  # on the head, or on a draft rank of its own
        sizes[plan.draft_rank or 0] += _kv_bytes(plan.draft.n_layers, capacity, plan.draft.kv_dim, 1)
    return sizes


def check_memory(plans: Sequence[Plan], local_ranks: Sequence[int] | None = None,
                 memory: tuple[int, int] | None = None) -> str | None:
    """Refuse (ExecutorSetupError) a job whose largest generation needs more than ``REFUSE_SHARE`` of this
    machine's memory on the ``local_ranks`` it runs here (default: all); return a one-line warning when it
    needs more than is available now, else None."""
    memory = memory if memory is not None else machine_memory()
    if memory is None:
        return None
    total, available = memory
    worst, worst_plan = 0, None
    for plan in plans:
        sizes = rank_bytes(plan)
        here = sum(sizes[r] for r in (local_ranks if local_ranks is not None else range(plan.n_ranks)))
        if here > worst:
            worst, worst_plan = here, plan
    if worst_plan is None:
        return None
    sc = worst_plan.scenario
    what = (f"workload.generate_tokens={sc.workload.generate_tokens} with prompt {sc.workload.prompt_tokens}, "
            f"executor.kv_headroom={sc.executor.kv_headroom} and {worst_plan.max_seqs} KV sequences per cache")
    if worst > REFUSE_SHARE * total:
        raise ExecutorSetupError(f"{what} needs about {gb(worst)} on this machine (KV caches and trace records), "
                                 f"more than {REFUSE_SHARE:.0%} of its {gb(total)}: generate fewer tokens, or "
                                 f"lower strategy.n_partitions or executor.kv_headroom")
    if worst > available:
        return (f"warning: {what} needs about {gb(worst)}, more than the {gb(available)} available now; "
                "the job may be killed for memory")
    return None
