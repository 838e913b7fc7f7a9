"""The scheduling core, driven by a reference engine that models the KV cache exactly."""

from __future__ import annotations

import random

import pytest

from pipesim.scheduling import KVPartitionPool, make_strategy
from pipesim.scheduling.prefix import common_prefix_len
from pipesim.world.acceptance import AcceptanceModel, OracleDraft, SyntheticTokens

from .kv_model import drive

PROMPT_LEN = 7


def _run(name: str, alpha: float, seed: int, n_generate: int = 60, **params):
    tokens = SyntheticTokens(vocab_size=97, seed=seed)
    draft = OracleDraft(tokens, AcceptanceModel("iid", alpha, prompt_len=PROMPT_LEN, seed=seed))
    prompt = [tokens.token(p) for p in range(PROMPT_LEN)]
    strategy = make_strategy(name, prompt, n_generate, params)
    return strategy, drive(strategy, tokens, draft, random.Random(seed))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("name", ["iterative", "speculative", "pipeinfer", "speed"])
@pytest.mark.parametrize("seed", range(6))
def test_output_equals_target_greedy_and_kv_contexts_are_exact(name, alpha, seed):
    # SPEED's chain is bounded by the pipeline depth in a real engine; here, by max_runs_in_flight
    params = {"exit_layer": 2, "max_runs_in_flight": 5} if name == "speed" else {}
    strategy, result = _run(name, alpha, seed, **params)
    assert result.output == result.truth
    assert len(result.output) == 60
    assert result.checked_contexts >= 60


@pytest.mark.parametrize("micro_batch", [1, 2, 4])
@pytest.mark.parametrize("max_runs", [None, 2, 5])
def test_pipeinfer_knobs_keep_output_exact(micro_batch, max_runs):
    _, result = _run("pipeinfer", 0.6, 3, micro_batch=micro_batch, max_runs_in_flight=max_runs)
    assert result.output == result.truth


def test_pipeinfer_cancels_runs_below_full_acceptance_and_not_at_full():
    _, low = _run("pipeinfer", 0.5, 1)
    _, full = _run("pipeinfer", 1.0, 1, n_generate=40)
    assert low.cancelled > 0
    # at alpha=1 only the runs left in flight when generation completes are cancelled
    assert full.cancelled <= full.launched - 40 // 4


def test_pipeinfer_partitions_return_to_the_pool_and_kv_stays_bounded():
    strategy, result = _run("pipeinfer", 0.7, 2, n_generate=1000, n_partitions=8)
    assert result.output == result.truth
    assert strategy.pool.n_used == 0 and strategy.pool.n_free == 8
    # cells: the committed sequence plus at most the in-flight partitions' tokens
    assert result.max_cells <= PROMPT_LEN + 1000 + 8 * 3 + 3


def test_speed_chains_early_exits_and_cancels_on_mismatch():
    strategy, result = _run("speed", 0.6, 5, exit_layer=2, max_runs_in_flight=6)
    assert result.output == result.truth
    assert result.launched > 60  # speculative one-token runs beyond the non-speculative ones
    assert result.cancelled > 0
    assert strategy.pool.n_used == 0


def test_pipeinfer_with_one_partition_still_finishes():
    strategy, result = _run("pipeinfer", 0.8, 4, n_partitions=1)
    assert result.output == result.truth


def test_stop_token_ends_generation():
    tokens = SyntheticTokens(vocab_size=97, seed=0)
    prompt = [tokens.token(p) for p in range(PROMPT_LEN)]
    stop = tokens.token(PROMPT_LEN + 5)
    strategy = make_strategy("iterative", prompt, 50, stop_tokens=[stop])
    draft = OracleDraft(tokens, AcceptanceModel("iid", 0.5, seed=0))
    result = drive(strategy, tokens, draft, random.Random(0))
    assert result.output[-1] == stop and len(result.output) == 6


def test_unknown_strategy_and_bad_parameters_raise():
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        make_strategy("nope", [1], 3)
    with pytest.raises(ValueError, match="gamma"):
        make_strategy("speculative", [1], 3, {"gamma": 0})
    with pytest.raises(ValueError, match="micro_batch"):
        make_strategy("pipeinfer", [1], 3, {"micro_batch": 0})


def test_partition_pool_is_fifo_and_bounded():
    pool = KVPartitionPool(3)
    assert [pool.acquire(), pool.acquire(), pool.acquire(), pool.acquire()] == [1, 2, 3, None]
    pool.release(2)
    pool.release(1)
    assert pool.acquire() == 2 and pool.acquire() == 1
    with pytest.raises(ValueError, match="not in use"):
        pool.release(7)


@pytest.mark.parametrize("a,b,expected", [
    ([1, 2, 3], [1, 2, 3, 4], 3), ([1, 2, 3], [1, 9, 3], 1), ([], [1], 0), ((5, 6), [5, 6], 2),
    (list(range(100)), list(range(50)) + [0] * 50, 50),
])
def test_common_prefix_len(a, b, expected):
    assert common_prefix_len(a, b) == expected

