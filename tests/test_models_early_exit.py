"""Early-exit self-draft (SPEED): adapters, exits of a real decoder, training on self-generated text."""

from __future__ import annotations

import argparse
import json

import pytest

torch = pytest.importorskip("torch")

from pipesim.models.early_exit import (  # noqa: E402
    AdapterMismatchError,
    ExitAdapter,
    capture_exit_states,
    early_exit_logits,
    exit_agreement,
    forward_with_exits,
    shipped_acceptance,
    shipped_adapter_path,
    shipped_adapters_dir,
)
from pipesim.models.exit_training import (  # noqa: E402
    ExitTrainingConfig,
    collect_exit_data,
    random_prompts,
    split_data,
    train_adapter,
    train_exit_adapters,
)
from pipesim.models.fetch import find_model  # noqa: E402
from pipesim.models.kv_cache import token_seq_mask  # noqa: E402
from pipesim.models.llama import LlamaConfig, LlamaStage, greedy_generate  # noqa: E402
from pipesim.models.tiny import build_tiny_stage, make_tiny_model_weights  # noqa: E402

SEQUENCE = [3, 17, 250, 9, 42, 77, 5, 128, 64, 1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return build_tiny_stage(make_tiny_model_weights(seed=0))


def perturbed(adapter: ExitAdapter, seed: int = 1) -> ExitAdapter:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return adapter


# ----------------------------------------------------------------- exits of the decoder


def test_exit_states_match_a_stage_split_and_the_last_exit_is_the_model(model):
    logits, hidden = capture_exit_states(model, SEQUENCE, [2, 4])
    n = len(SEQUENCE)
    ids, positions, seqs = torch.tensor(SEQUENCE), torch.arange(n), token_seq_mask([0] * n, 1)
    weights = make_tiny_model_weights(seed=0)
    first = build_tiny_stage(weights, 0, 2)
    torch.testing.assert_close(hidden[2], first(ids, positions, seqs, first.make_kv_cache(n)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(early_exit_logits(model, hidden[4]), logits, atol=1e-4, rtol=1e-4)
    assert hidden[2].shape == (n, model.config.d_model) and not hidden[2].is_inference()


def test_exit_layers_outside_a_stage_are_rejected(model):
    tail = build_tiny_stage(make_tiny_model_weights(seed=0), 2, 4)
    n = 3
    with pytest.raises(ValueError, match=r"exit layer 2 is not computed by stage \[2, 4\)"):
        forward_with_exits(tail, torch.zeros(n, 64), torch.arange(n), token_seq_mask([0] * n, 1), tail.make_kv_cache(n), [2])
    with pytest.raises(ValueError, match="has_output_head=False"):
        early_exit_logits(build_tiny_stage(make_tiny_model_weights(seed=0), 0, 2), torch.zeros(1, 64))


# ----------------------------------------------------------------- the adapter


@pytest.mark.parametrize("rank", [None, 8])
def test_untrained_adapter_is_the_plain_early_exit(model, rank):
    _, hidden = capture_exit_states(model, SEQUENCE, 2)
    adapter = ExitAdapter.for_model(model, 2, rank=rank)
    assert torch.equal(adapter(hidden[2]), hidden[2])
    assert torch.equal(early_exit_logits(model, hidden[2], adapter), early_exit_logits(model, hidden[2]))
    assert adapter.n_params() == (64 * 64 if rank is None else 2 * 64 * rank) + 64 + 1


def test_adapter_is_scale_equivariant(model):
    adapter = perturbed(ExitAdapter.for_model(model, 2, rank=8))
    h = torch.randn(5, 64)
    torch.testing.assert_close(adapter(3.0 * h), 3.0 * adapter(h))


def test_save_load_round_trip(model, tmp_path):
    _, hidden = capture_exit_states(model, SEQUENCE, 2)
    adapter = perturbed(ExitAdapter.for_model(model, 2, rank=8))
    adapter.notes = {"trained": 0.5}
    path = adapter.save(tmp_path / "a.pt")
    assert path.stat().st_size < 20_000  # float16 tensors
    loaded = ExitAdapter.load(path, model, 2)
    assert (loaded.rank, loaded.exit_layer, loaded.notes, loaded.target) == (8, 2, {"trained": 0.5}, adapter.target)
    torch.testing.assert_close(
        early_exit_logits(model, hidden[2], loaded), early_exit_logits(model, hidden[2], adapter), atol=2e-2, rtol=1e-2
    )
    full = ExitAdapter.load(perturbed(ExitAdapter.for_model(model, 3)).save(tmp_path / "b.pt"))
    assert full.rank is None and full.exit_layer == 3


def test_load_names_the_mismatching_field(model, tmp_path):
    path = ExitAdapter.for_model(model, 2).save(tmp_path / "a.pt")
    with pytest.raises(AdapterMismatchError, match="trained for exit_layer=2, not exit_layer=3"):
        ExitAdapter.load(path, model, 3)
    other = build_tiny_stage(make_tiny_model_weights(seed=1))
    with pytest.raises(AdapterMismatchError, match="model_fingerprint="):
        ExitAdapter.load(path, other, 2)
    small = LlamaStage(LlamaConfig(2, 32, 4, 2, 64, 256, name="small"), 0, 2, True, True)
    with pytest.raises(AdapterMismatchError, match="d_model=64, but model 'small' has d_model=32"):
        ExitAdapter.load(path, small)
    (tmp_path / "x.pt").write_bytes(b"not an adapter")
    with pytest.raises(ValueError, match="cannot read exit adapter file"):
        ExitAdapter.load(tmp_path / "x.pt")
    torch.save({"format": "other"}, tmp_path / "y.pt")
    with pytest.raises(ValueError, match="is not a pipesim exit adapter file"):
        ExitAdapter.load(tmp_path / "y.pt")
    with pytest.raises(FileNotFoundError):
        ExitAdapter.load(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="needs target"):
        ExitAdapter(64).save(tmp_path / "z.pt")
    with pytest.raises(ValueError, match="rank must be None"):
        ExitAdapter(64, rank=0)


# ----------------------------------------------------------------- training on self-generated text


@pytest.fixture(scope="module")
def tiny_data(model):
    prompts = random_prompts(400, 8, model.config.vocab_size, seed=0)
    data = collect_exit_data(model, prompts, (1, 2, 3, 4), 6000, max_new_tokens=32, batch_size=32, progress=False)
    return prompts, data


def test_collected_targets_are_the_models_greedy_tokens(model, tiny_data):
    prompts, data = tiny_data
    assert len(data) >= 6000 and set(data.hidden) == {1, 2, 3, 4}
    torch.testing.assert_close(
        early_exit_logits(model, data.hidden[4][:200]).argmax(-1), data.targets[:200]
    )  # the exit after all layers is the model itself
    greedy = data.greedy & (data.prompt_index == data.prompt_index[data.greedy][0])
    prompt = prompts[int(data.prompt_index[greedy][0])]
    assert greedy_generate(model, prompt, int(greedy.sum())) == data.targets[greedy].tolist()
    assert 0.15 < float((~data.greedy).float().mean()) < 0.35  # about a quarter of continuations sampled


def test_training_on_the_tiny_model_raises_held_out_agreement(model, tiny_data):
    """A random-weight model's later layers are far from linear, so the attainable gain is small (about
    +0.02-0.03 here, measured over several weight seeds); the check is on held-out prompts."""
    prompts, data = tiny_data
    config = ExitTrainingConfig(layers=(1, 2, 3), steps=60, rank=None, ridge=0.1, lr=3e-4, holdout=0.3)
    results = train_exit_adapters(model, prompts, config, data=data, progress=False)
    for result in results:
        assert result.n_holdout > 1500
        assert result.trained >= result.untrained + 0.01, result.summary()


def test_cross_entropy_steps_fit_the_training_data(model, tiny_data):
    prompts, data = tiny_data
    train, _ = split_data(data, len(prompts), 0.3, seed=0)
    hidden, targets = train.hidden[2][:512], train.targets[:512]
    adapter, losses = train_adapter(model, hidden, targets, 2, rank=16, steps=150, batch_size=128, lr=1e-2, progress=False)
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
    assert exit_agreement(model, hidden, targets, adapter) > exit_agreement(model, hidden, targets) + 0.15


def test_train_exit_command_on_the_tiny_model(tmp_path, capsys):
    from pipesim.models.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out, summary = tmp_path / "tiny-{layer}.pt", tmp_path / "acceptance.json"
    args = parser.parse_args(
        ["models", "train-exit", "--model", "tiny", "--layer", "1,2", "--tokens", "800", "--steps", "20",
         "--rank", "full", "--max-new-tokens", "16", "--threads", "1", "--quiet", "--out", str(out),
         "--summary", str(summary)]
    )
    assert args.func(args) == 0
    table = json.loads(summary.read_text())["tiny"]
    assert set(table["alpha"]) == {"1", "2"} and table["layers"]["2"]["file"] == "tiny-2.pt"
    adapter = ExitAdapter.load(tmp_path / "tiny-2.pt", build_tiny_stage(make_tiny_model_weights(seed=0)), 2)
    assert adapter.rank is None and adapter.notes["command"].startswith("pipesim models train-exit --layer 1,2")
    assert "untrained" in capsys.readouterr().out
    bad = parser.parse_args(["models", "train-exit", "--model", "tiny", "--layer", "1,2", "--out", "x.pt"])
    assert bad.func(bad) == 2


# ----------------------------------------------------------------- the shipped SmolLM2 adapters

SMOLLM2_PATH = find_model("smollm2")
# Requests unlike the training prompts (exit_training.chat_prompts), so the continuations are fresh text.
FRESH_PROMPTS = (
    "Describe how a lighthouse keeper might spend a stormy night.",
    "What are good strategies for learning a new language as an adult?",
    "Explain how a refrigerator keeps food cold.",
)


def test_shipped_table_lists_files_that_exist():
    table = shipped_acceptance("smollm2")
    assert table and all(0 < alpha < 1 for alpha in table.values())
    for layer in table:
        assert shipped_adapter_path(layer).is_file()
        assert shipped_adapter_path(layer).stat().st_size < 1_000_000
    with pytest.raises(KeyError, match="no shipped smollm2 exit adapter for exit_layer=29"):
        shipped_adapter_path(29)
    assert shipped_adapters_dir().name == "exit_adapters"


@pytest.mark.smollm2
@pytest.mark.skipif(
    SMOLLM2_PATH is None,
    reason="SmolLM2 GGUF not in the cache ($PIPESIM_CACHE or ~/.cache/pipesim): run `pipesim models fetch smollm2`",
)
def test_shipped_smollm2_adapters_beat_the_plain_exit_on_fresh_text():
    from pipesim.models.gguf_loader import load_gguf_stage, open_gguf
    from pipesim.models.tokenizer import GGUFTokenizer

    reader = open_gguf(SMOLLM2_PATH)
    model, tokenizer = load_gguf_stage(reader), GGUFTokenizer.from_gguf(reader)
    layers = sorted(shipped_acceptance("smollm2"))
    hidden, targets = {k: [] for k in layers}, []
    for text in FRESH_PROMPTS:
        prompt = tokenizer.encode_chat(text)
        answer = greedy_generate(model, prompt, 48, eos_id=tokenizer.eos_id)
        logits, states = capture_exit_states(model, prompt + answer, layers)
        start = len(prompt) - 1  # positions whose next token is part of the answer
        targets.append(logits[start:].argmax(-1))
        for k in layers:
            hidden[k].append(states[k][start:])
    targets = torch.cat(targets)
    for k in layers:
        states = torch.cat(hidden[k])
        adapter = ExitAdapter.load(shipped_adapter_path(k), model, k)
        plain, trained = exit_agreement(model, states, targets), exit_agreement(model, states, targets, adapter)
        assert trained > plain + 0.15, (k, plain, trained)
