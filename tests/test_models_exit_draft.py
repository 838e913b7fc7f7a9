"""Truncated early-exit drafts (``MODEL-exitK``) and the draft-agreement measurements, without MPI.

The tiny random model checks the mechanics (a truncated stage is the first K layers with the plain or adapted
exit; speculative windows follow from the agreement sequence as real drafting finds them); SmolLM2 checks the
shipped draft loads from the repository alone (skipped when the GGUF is not fetched; CI fetches it).
"""

from __future__ import annotations

import pytest
import torch

from pipesim.executor.errors import ExecutorSetupError
from pipesim.executor.modelref import resolve_model
from pipesim.models.draft_eval import (
    DraftPair,
    agreement_pairs,
    conditional_rates,
    target_continuations,
    windows,
)
from pipesim.models.early_exit import ExitAdapter, capture_exit_states, early_exit_logits
from pipesim.models.exit_drafts import parse_exit_draft, shipped_exit_adapters
from pipesim.models.fetch import find_model
from pipesim.models.kv_cache import token_seq_mask
from pipesim.models.llama import LlamaStage
from pipesim.models.tiny import make_tiny_model_weights, tiny_config


def test_exit_draft_names():
    assert parse_exit_draft("smollm2-exit10").layers == 10
    assert parse_exit_draft("smollm2-exit10").base == "smollm2"
    assert parse_exit_draft("tiny-llama@3-exit2").base == "tiny-llama@3"
    assert parse_exit_draft("smollm2") is None and parse_exit_draft("tiny-llama@1") is None
    ref = resolve_model("tiny-llama@5-exit3", "executor.draft_model")
    assert (ref.n_layers, ref.exit_layers, ref.seed, ref.adapter) == (3, 3, 5, None)
    assert ref.weights_key == resolve_model("tiny-llama@5", "x").weights_key
    assert ref.key != resolve_model("tiny-llama@5", "x").key


@pytest.mark.parametrize("text, message", [
    ("tiny-llama-exit0", "keeps 1..3 of the 4 layers"),
    ("tiny-llama-exit4", "keeps 1..3 of the 4 layers"),
    ("nowhere.gguf-exit2", "model file not found"),
])
def test_bad_exit_drafts_are_one_clear_error(text, message):
    with pytest.raises(ExecutorSetupError, match=message) as info:
        resolve_model(text, "executor.draft_model")
    assert "executor.draft_model=" in str(info.value) and "\n" not in str(info.value)


def _tiny(seed: int = 0) -> tuple[LlamaStage, dict]:
    weights = make_tiny_model_weights("tiny-llama", seed=seed)
    return LlamaStage.from_weights(tiny_config("tiny-llama"), weights), weights


def _forward(stage: LlamaStage, ids: list[int]) -> torch.Tensor:
    n = len(ids)
    return stage(torch.tensor(ids), torch.arange(n), token_seq_mask([0] * n, 1), stage.make_kv_cache(n))


@pytest.mark.parametrize("with_adapter", [False, True])
def test_a_truncated_stage_is_the_early_exit_of_the_full_model(with_adapter):
    full, weights = _tiny()
    k = 2
    truncated = LlamaStage.from_weights(full.config, weights, 0, k, True, True)
    adapter = None
    if with_adapter:
        adapter = ExitAdapter.for_model(full, k)
        with torch.no_grad():
            adapter.bias.copy_(torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(1)))
            adapter.log_scale.fill_(0.5)
        truncated.set_exit_adapter(adapter)
    ids = [5, 17, 200, 3, 99, 41]
    _, hidden = capture_exit_states(full, ids, [k])
    with torch.no_grad():
        expected = early_exit_logits(full, hidden[k], adapter)
    got = _forward(truncated, ids)
    assert torch.allclose(got, expected, atol=1e-4)
    # the exit differs from the full model's own head (else the test could not tell them apart)
    assert not torch.allclose(got, _forward(full, ids), atol=1e-2)


def test_an_exit_adapter_needs_the_output_head():
    _, weights = _tiny()
    body = LlamaStage.from_weights(tiny_config("tiny-llama"), weights, 0, 2, True, False)
    with pytest.raises(ValueError, match="needs a stage with the output head"):
        body.set_exit_adapter(ExitAdapter(64))


def _pairs(agree: list[int], prompt: int = 0) -> list[DraftPair]:
    return [DraftPair(prompt, i, 1 if ok else 2, 1, 0.5) for i, ok in enumerate(agree)]


def test_windows_by_hand():
    # positions: 0 1 2 3 4 5 6 7 8 9 ; gamma 2:
    # window at 0: 1,1 -> run 2 (commit 0,1 and the target's 2); at 3: 1,1 -> 2 (commit 3,4,5);
    # at 6: 1,0 -> 1 (commit 6,7); at 8: 0 -> 0 (width 1: only position 8 is left to draft) ; end
    stats = windows(_pairs([1, 1, 0, 1, 1, 1, 1, 0, 0, 1]), 2)
    assert stats.runs == [2, 2, 1, 0]
    assert stats.checked == 2 + 2 + 2 + 1
    assert stats.acceptance_rate == pytest.approx(5 / 7)
    assert stats.tokens_per_window == pytest.approx(5 / 4 + 1)
    assert stats.histogram() == [1, 1, 2]
    rates = conditional_rates(_pairs([1, 1, 0, 1, 1, 1, 1, 0, 0, 1]))
    # after an agreement (positions 0,1,3,4,5,6 -> next 1,0,1,1,1,0): 4/6; after a disagreement (2,7,8 -> 1,0,1)
    assert rates["alpha"] == pytest.approx(0.7)
    assert rates["after_accept"] == pytest.approx(4 / 6) and rates["after_reject"] == pytest.approx(2 / 3)
    assert windows(_pairs([1, 1, 1], 0) + _pairs([0, 0], 1), 8).runs == [2, 0]


def test_windows_equal_real_autoregressive_drafting():
    """Draft gamma tokens from the committed prefix with the draft's own KV cache, verify against the target's
    greedy continuation, commit accepted + 1: the runs are the ones ``windows`` reads off the agreement."""
    from pipesim.executor.torch_backend import ModelRunner
    from pipesim.models.llama import greedy_generate

    target, weights = _tiny(0)
    draft = LlamaStage.from_weights(target.config, weights, 0, 3, True, True)  # tiny-llama-exit3
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8]]
    n, gamma = 40, 3
    truths = target_continuations(target, prompts, n)
    pairs = agreement_pairs(draft, prompts, truths)
    assert 0.05 < conditional_rates(pairs)["alpha"] < 0.95  # some agreement, some not: the runs vary
    runs = []
    for prompt in prompts:
        truth = greedy_generate(target, prompt, n)  # computed again here, apart from target_continuations
        runner = ModelRunner(draft, len(prompt) + n + gamma + 2)
        committed = 0
        while committed < n - 1:
            width = min(gamma, n - 1 - committed)
            context = prompt + truth[:committed]
            pending = runner.rewind(context)
            drafted = []
            for _ in range(width):
                token, _p = runner.feed(pending)
                drafted.append(token)
                pending = [token]
            run = 0
            while run < width and drafted[run] == truth[committed + run]:
                run += 1
            runs.append(run)
            committed += run + 1
    assert windows(pairs, gamma).runs == runs


def test_held_out_prompts_are_apart_from_the_adapters_prompts():
    from pipesim.models.draft_eval import HELDOUT_PROMPTS
    from pipesim.models.exit_training import chat_prompts, eval_prompts

    seen = " ".join(chat_prompts() + eval_prompts()).lower()
    assert len(set(HELDOUT_PROMPTS)) == len(HELDOUT_PROMPTS) >= 5
    assert not any(prompt.lower() in seen for prompt in HELDOUT_PROMPTS)


def test_agreement_pairs_of_the_target_itself_always_agree():
    target, _ = _tiny(0)
    pairs = agreement_pairs(target, [[1, 2, 3, 4]], target_continuations(target, [[1, 2, 3, 4]], 12))
    assert len(pairs) == 12 and all(p.accepted for p in pairs) and all(0 < p.probability <= 1 for p in pairs)


# -- SmolLM2: the shipped draft -------------------------------------------------------------------------------

@pytest.mark.smollm2
def test_the_shipped_smollm2_draft_loads_without_network(monkeypatch):
    if find_model("smollm2") is None:
        pytest.skip("SmolLM2-135M GGUF not fetched: run `pipesim models fetch smollm2`")
    import socket

    from pipesim.executor.torch_backend import ModelStore
    from pipesim.models.tokenizer import GGUFTokenizer

    def no_network(*args, **kwargs):
        raise AssertionError("the shipped draft tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    shipped = shipped_exit_adapters("smollm2")
    assert 10 in shipped and shipped[10].is_file()
    ref = resolve_model("smollm2-exit10", "executor.draft_model")
    assert ref.n_layers == 10 and ref.adapter == shipped[10]
    store = ModelStore()
    draft = store.full_model(ref)
    assert draft.n_stage_layers == 10 and draft.exit_adapter is not None
    target = store.full_model(resolve_model("smollm2", "executor.model"))
    prompt = GGUFTokenizer.from_gguf(store._reader(ref)).encode_chat("Name three colours of the rainbow.")
    pairs = agreement_pairs(draft, [prompt], target_continuations(target, [prompt], 16))
    # the adapted exit agrees with the target on some positions of a plain answer (a broken adapter or head
    # agrees on none: the plain exit after 10 layers measured 0.05, benchmarks/results/draft_smollm2.md)
    assert sum(p.accepted for p in pairs) >= 3
    with pytest.raises(ExecutorSetupError, match="no exit adapter ships for the state after 7 layers"):
        resolve_model("smollm2-exit7", "executor.draft_model")


def test_the_recorded_agreement_matches_its_pairs():
    """benchmarks/results/draft_smollm2.md and its pairs CSV come from one run: the kept draft's alpha there is the
    mean of its accepted column (a stale table or a CSV of another draft would not match)."""
    import csv
    import re
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    table = (results / "draft_smollm2.md").read_text()
    row = re.search(r"^\| `smollm2-exit10` \| ([0-9.]+) \|", table, re.MULTILINE)
    assert row is not None
    with (results / "draft_smollm2_pairs.csv").open() as handle:
        pairs = list(csv.DictReader(handle))
    assert {p["draft"] for p in pairs} == {"smollm2-exit10"}
    accepted = [int(p["accepted"]) for p in pairs]
    assert float(row.group(1)) == pytest.approx(sum(accepted) / len(accepted), abs=5e-4)
    assert all((p["draft_token"] == p["target_token"]) == (p["accepted"] == "1") for p in pairs)
