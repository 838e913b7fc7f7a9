"""PipeSpec's per-level state machines: exact greedy output under any message order, KV contexts, rollbacks."""

from __future__ import annotations

import random

import pytest

from pipesim.scheduling.strategies.pipespec import make_pipespec_chain
from pipesim.world.acceptance import SyntheticTokens

from .kv_model import drive_chain

PROMPT_LEN = 5


def _chain(accuracies, seed, n_generate=50, **params):
    tokens = SyntheticTokens(vocab_size=89, seed=seed)
    prompt = [tokens.token(p) for p in range(PROMPT_LEN)]
    levels = make_pipespec_chain(prompt, n_generate, len(accuracies) + 1, **params)
    return drive_chain(levels, tokens, [*accuracies, 1.0], seed, random.Random(seed))


@pytest.mark.parametrize("accuracies", [[0.0], [0.5], [0.9], [1.0], [0.3, 0.7], [0.6, 0.9], [0.0, 0.0],
                                        [0.5, 0.8, 0.95]])
@pytest.mark.parametrize("synchronous", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_chain_output_equals_target_greedy(accuracies, synchronous, seed):
    output, truth, stats = _chain(accuracies, seed, synchronous=synchronous, lookahead=4)
    assert output == truth and len(output) == 50


def test_rejections_roll_back_upstream_and_cancel_stale_runs():
    output, truth, stats = _chain([0.4, 0.7], 3)
    assert output == truth
    assert stats["rollbacks"] > 0 and stats["cancelled"] > 0


@pytest.mark.parametrize("lookahead,max_verify", [(1, 1), (2, 16), (16, 4)])
def test_knobs_keep_output_exact(lookahead, max_verify):
    output, truth, _ = _chain([0.6, 0.85], 1, lookahead=lookahead, max_verify=max_verify)
    assert output == truth


def test_chain_needs_two_models_and_sane_knobs():
    with pytest.raises(ValueError, match="at least 2 models"):
        make_pipespec_chain([1], 5, 1)
    with pytest.raises(ValueError, match="lookahead"):
        make_pipespec_chain([1], 5, 2, lookahead=0)
