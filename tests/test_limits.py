"""Limits before work: the memory estimate of a generation, by hand from the model shape, and the refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipesim.executor.errors import ExecutorSetupError
from pipesim.executor.limits import check_memory, rank_bytes
from pipesim.executor.plan import make_plan
from pipesim.limits import check_simulation_memory
from pipesim.scenario import ScenarioError, load_scenario

TINY = Path(__file__).resolve().parents[1] / "scenarios" / "local-tiny.yaml"


def tiny_plan(*sets: str):
    return make_plan(load_scenario(TINY, list(sets)), 2)


def test_kv_estimate_by_hand_from_the_tiny_model_shape():
    # tiny-llama: 4 layers, d_model 64, 4 heads, 2 KV heads -> head_dim 16, kv width 32; 2 layers per rank
    plan = tiny_plan("workload.generate_tokens=1000")  # pipeinfer, oracle draft, real compute
    cells = 16 + 1000 + 512  # prompt + generated + executor.kv_headroom
    # k and v float32 + a flag per sequence (0, the 1000 partitions and the reference's max_seq 1001, which its
    # relayed KV transactions touch) + bookkeeping
    kv_stage = 2 * 2 * cells * 32 * 4 + cells * (1002 + 12)
    records = 1000 * 4096
    reference = 2 * 4 * (16 + 1000 + 64) * 32 * 4 + (16 + 1000 + 64) * (1 + 12)  # the whole model, one sequence
    assert rank_bytes(plan) == [kv_stage + 2 * records + reference, kv_stage + records]


def test_emulated_compute_holds_no_kv_and_iterative_one_sequence():
    emulated = tiny_plan("workload.generate_tokens=1000", "executor.compute=emulated")
    assert rank_bytes(emulated) == [2 * 1000 * 4096, 1000 * 4096]
    iterative = tiny_plan("workload.generate_tokens=1000", "strategy.name=iterative")
    cells = 16 + 1000 + 512
    assert rank_bytes(iterative)[1] == 2 * 2 * cells * 32 * 4 + cells * (1 + 12) + 1000 * 4096


def test_refused_above_the_share_of_memory_warned_above_what_is_free():
    plan = tiny_plan("workload.generate_tokens=1000")
    need = sum(rank_bytes(plan))
    assert check_memory([plan], memory=(10 * need, 10 * need)) is None
    warning = check_memory([plan], memory=(10 * need, need // 2))
    assert warning is not None and warning.startswith("warning: workload.generate_tokens=1000")
    with pytest.raises(ExecutorSetupError, match="generate_tokens=1000 .* more than 80% of its"):
        check_memory([plan], memory=(need, need))
    alone = rank_bytes(plan)[1]  # rank 1 alone on its host: fits in 2x its need, not in the half free
    assert check_memory([plan], [1], memory=(2 * alone, alone // 2)) is not None
    assert check_memory([plan], [1], memory=(2 * alone, 2 * alone)) is None


def test_a_simulation_whose_trace_cannot_fit_is_refused():
    scenario = load_scenario(TINY, ["workload.generate_tokens=1000"])
    need = 1000 * 2 * 4096
    check_simulation_memory(scenario, memory=(2 * need, 2 * need))
    with pytest.raises(ScenarioError, match="generate_tokens=1000 on 2 nodes"):
        check_simulation_memory(scenario, memory=(need, need))
