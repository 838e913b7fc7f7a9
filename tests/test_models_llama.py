"""Llama stages on the tiny random model: pipeline splits, KV cache use, several sequences in one batch."""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from pipesim.models.kv_cache import KVCache, token_seq_mask  # noqa: E402
from pipesim.models.llama import (  # noqa: E402
    LlamaConfig,
    LlamaStage,
    apply_rope,
    greedy_generate,
    split_layers,
)
from pipesim.models.tiny import build_tiny_stage, make_tiny_model_weights, tiny_config  # noqa: E402

ATOL = 1e-5
PROMPT = [3, 17, 250, 9, 42, 77, 5, 128]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights():
    return make_tiny_model_weights(seed=0)


@pytest.fixture(scope="module")
def model(weights):
    return build_tiny_stage(weights)


def seq_rows(n: int, seqs, max_seqs: int) -> torch.Tensor:
    return token_seq_mask([seqs] * n, max_seqs)


def run(model: LlamaStage, kv: KVCache, tokens, positions, seqs) -> torch.Tensor:
    """Forward a batch whose per-token sequence sets are given (int or list per token)."""
    return model(torch.tensor(tokens), torch.tensor(positions), token_seq_mask(seqs, kv.max_seqs), kv)


def full_logits(model: LlamaStage, tokens: list[int]) -> torch.Tensor:
    kv = model.make_kv_cache(64)
    return run(model, kv, tokens, list(range(len(tokens))), [0] * len(tokens))


# ---------------------------------------------------------------------------- layer split


def test_split_layers_by_fractions():
    assert split_layers(30, [0.1, 0.9]) == [(0, 3), (3, 30)]
    assert split_layers(4, [1, 1, 1, 1]) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert split_layers(4, [0.01, 0.01, 0.98]) == [(0, 1), (1, 2), (2, 4)]  # every stage gets a layer
    assert split_layers(10, [0.98, 0.01, 0.01]) == [(0, 8), (8, 9), (9, 10)]
    assert split_layers(5, [1.0]) == [(0, 5)]
    with pytest.raises(ValueError, match="more than the model.s 4 layers"):
        split_layers(4, [1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="must be > 0"):
        split_layers(4, [0.5, 0.0])


# ---------------------------------------------------------------------------- model basics


def test_config_validation_names_fields():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(n_layers=1, d_model=64, n_heads=4, n_kv_heads=3, d_ffn=8, vocab_size=10)
    with pytest.raises(ValueError, match="rope_style"):
        LlamaConfig(n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, d_ffn=8, vocab_size=10, rope_style="x")
    with pytest.raises(ValueError, match=r"within \[0, 4\]"):
        LlamaStage(tiny_config(), 2, 5, False, False)


def test_weights_are_deterministic_and_greedy_output_varies(weights, model):
    again = make_tiny_model_weights(seed=0)
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert not torch.equal(
        weights["blk.0.attn_q.weight"], make_tiny_model_weights(seed=1)["blk.0.attn_q.weight"]
    )
    out = greedy_generate(model, PROMPT, 24)
    assert len(out) == 24
    assert len(set(out)) >= 12, f"greedy decoding of the tiny model is degenerate: {out}"


@pytest.mark.parametrize("style", ["interleaved", "half"])
def test_rope_is_a_rotation_depending_on_relative_position(style):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 16, generator=gen)
    k = torch.randn(1, 2, 16, generator=gen)
    inv_freq = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)

    def rot(x, pos):
        angles = torch.tensor([float(pos)], dtype=torch.float64)[:, None] * inv_freq[None, :]
        return apply_rope(x, angles.cos().float(), angles.sin().float(), style)

    assert torch.allclose(rot(q, 7).norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    dot = lambda a, b: (rot(q, a) * rot(k, b)).sum()  # noqa: E731
    assert torch.allclose(dot(5, 2), dot(13, 10), atol=1e-4)
    assert not torch.allclose(dot(5, 2), dot(5, 3), atol=1e-4)


@pytest.mark.parametrize("fractions", [[0.5, 0.5], [0.25, 0.5, 0.25]])
def test_pipeline_split_matches_full_model(weights, model, fractions):
    config = model.config
    stages = [
        build_tiny_stage(weights, start, end) for start, end in split_layers(config.n_layers, fractions)
    ]
    assert stages[0].has_embedding and not stages[0].has_output_head
    assert stages[-1].has_output_head and not stages[-1].has_embedding
    caches = [stage.make_kv_cache(64) for stage in stages]
    reference = full_logits(model, PROMPT)
    positions = torch.arange(len(PROMPT))
    seqs = seq_rows(len(PROMPT), 0, 1)
    x = torch.tensor(PROMPT)
    for stage, kv in zip(stages, caches, strict=True):
        x = stage(x, positions, seqs, kv)
    assert x.shape == (len(PROMPT), config.vocab_size)
    torch.testing.assert_close(x, reference, atol=ATOL, rtol=0)


def test_tied_embedding_head_only_stage_reads_the_embedding(weights):
    tied = {k: v for k, v in weights.items() if k != "output.weight"}
    config = replace(tiny_config(), tied_embeddings=True)
    full = LlamaStage.from_weights(config, tied)
    assert full.output is None  # reuses the embedding matrix
    head = LlamaStage.from_weights(config, tied, 0, 2)
    tail = LlamaStage.from_weights(config, tied, 2, 4)
    assert tail.tensor_names()[-2:] == ["output_norm.weight", "token_embd.weight"]
    positions, seqs = torch.arange(len(PROMPT)), seq_rows(len(PROMPT), 0, 1)
    hidden = head(torch.tensor(PROMPT), positions, seqs, head.make_kv_cache(16))
    logits = tail(hidden, positions, seqs, tail.make_kv_cache(16))
    reference = full(torch.tensor(PROMPT), positions, seqs, full.make_kv_cache(16))
    torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)


def test_load_weights_reports_missing_and_misshapen_tensors(weights):
    partial = {k: v for k, v in weights.items() if not k.startswith("blk.1.")}
    with pytest.raises(KeyError, match="blk.1.attn_norm.weight"):
        build_tiny_stage(partial)
    bad = dict(weights, **{"blk.0.attn_q.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="blk.0.attn_q.weight"):
        build_tiny_stage(bad)


def reference_forward(weights: dict, config: LlamaConfig, tokens: list[int]) -> torch.Tensor:
    """Plain causal Llama forward written independently: complex-number rotary, repeat_interleave GQA."""
    n, hd, group = len(tokens), config.head_dim, config.n_heads // config.n_kv_heads
    freqs = config.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    rotation = torch.polar(torch.ones(n, hd // 2, dtype=torch.float64), torch.arange(n)[:, None] * freqs)

    def rope(x):  # x [n, heads, hd]; adjacent pairs are (real, imag)
        pairs = torch.view_as_complex(x.double().reshape(n, x.shape[1], hd // 2, 2).contiguous())
        return torch.view_as_real(pairs * rotation[:, None, :]).reshape(x.shape).float()

    def norm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + config.rms_norm_eps) * w

    x = weights["token_embd.weight"][torch.tensor(tokens)]
    causal = torch.ones(n, n).tril().bool()
    for layer in range(config.n_layers):
        w = {k.split(".")[2]: v for k, v in weights.items() if k.startswith(f"blk.{layer}.")}
        h = norm(x, w["attn_norm"])
        q = rope((h @ w["attn_q"].T).view(n, config.n_heads, hd))
        k = rope((h @ w["attn_k"].T).view(n, config.n_kv_heads, hd)).repeat_interleave(group, dim=1)
        v = (h @ w["attn_v"].T).view(n, config.n_kv_heads, hd).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / hd**0.5
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", probs, v).reshape(n, -1) @ w["attn_output"].T
        h = norm(x, w["ffn_norm"])
        x = x + (torch.nn.functional.silu(h @ w["ffn_gate"].T) * (h @ w["ffn_up"].T)) @ w["ffn_down"].T
    return norm(x, weights["output_norm.weight"]) @ weights["output.weight"].T


def test_model_matches_an_independent_reference(weights, model):
    reference = reference_forward(weights, model.config, PROMPT)
    torch.testing.assert_close(full_logits(model, PROMPT), reference, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- KV cache use


def test_incremental_decoding_equals_one_batched_forward(model):
    reference = full_logits(model, PROMPT)
    kv = model.make_kv_cache(64)
    rows = [run(model, kv, [t], [i], [0]) for i, t in enumerate(PROMPT)]
    torch.testing.assert_close(torch.cat(rows), reference, atol=ATOL, rtol=0)
    # prefill in two uneven chunks
    kv = model.make_kv_cache(64)
    first = run(model, kv, PROMPT[:3], [0, 1, 2], [0] * 3)
    rest = run(model, kv, PROMPT[3:], list(range(3, len(PROMPT))), [0] * (len(PROMPT) - 3))
    torch.testing.assert_close(torch.cat([first, rest]), reference, atol=ATOL, rtol=0)


def test_two_sequences_in_one_batch_match_running_each_alone(model):
    prefix, canonical_next, speculative = PROMPT[:5], 11, [60, 61, 62]
    P = len(prefix)
    kv = model.make_kv_cache(64, max_seqs=4)
    run(model, kv, prefix, list(range(P)), [0] * P)
    kv.seq_cp(0, 2)  # speculative partition 2 shares the canonical prefix
    # one batch: the canonical run's next token and a 3-token speculative run, from the same position
    batch = run(model, kv, [canonical_next, *speculative], [P, P, P + 1, P + 2], [0, 2, 2, 2])
    alone_canonical = full_logits(model, [*prefix, canonical_next])[-1:]
    alone_speculative = full_logits(model, [*prefix, *speculative])[-3:]
    torch.testing.assert_close(batch[:1], alone_canonical, atol=ATOL, rtol=0)
    torch.testing.assert_close(batch[1:], alone_speculative, atol=ATOL, rtol=0)
    assert kv.seq_positions(0) == list(range(P + 1)) and kv.seq_positions(2) == list(range(P + 3))


def test_token_tree_with_shared_trunk_matches_linear_runs(model):
    prefix = PROMPT[:4]
    kv = model.make_kv_cache(64, max_seqs=3)
    run(model, kv, prefix, [0, 1, 2, 3], [[0, 1, 2]] * 4)
    # trunk token 30 in both branches, then branch 1: 31, 32 and branch 2: 41
    tree = run(model, kv, [30, 31, 32, 41], [4, 5, 6, 5], [[1, 2], 1, 1, 2])
    branch1 = full_logits(model, [*prefix, 30, 31, 32])[-3:]
    branch2 = full_logits(model, [*prefix, 30, 41])[-2:]
    torch.testing.assert_close(tree[:3], branch1, atol=ATOL, rtol=0)
    torch.testing.assert_close(tree[3:], branch2[1:], atol=ATOL, rtol=0)


def test_seq_rm_of_rejected_positions_then_continuing_equals_never_having_them(model):
    prefix, accepted, rejected, after = PROMPT[:5], [70, 71], [90, 91], [33, 34, 35]
    P = len(prefix)
    kv = model.make_kv_cache(64, max_seqs=2)
    run(model, kv, prefix, list(range(P)), [0] * P)
    kv.seq_cp(0, 1)
    run(model, kv, [*accepted, *rejected], list(range(P, P + 4)), [1] * 4)  # speculation in seq 1
    kv.seq_cp(1, 0, P, P + 2)  # accept two tokens into the canonical sequence
    kv.seq_rm(1)  # retire the partition: rejected cells are freed
    assert kv.used_cells() == P + 2
    positions = list(range(P + 2, P + 5))
    cont = run(model, kv, after, positions, [0] * 3)
    reference = full_logits(model, [*prefix, *accepted, *after])[-3:]
    torch.testing.assert_close(cont, reference, atol=ATOL, rtol=0)


def test_cancellation_aborts_between_layers_and_leaves_the_cache_as_it_was(model):
    kv = model.make_kv_cache(32)
    run(model, kv, PROMPT[:3], [0, 1, 2], [0] * 3)
    assert (
        model(torch.tensor([5]), torch.tensor([3]), seq_rows(1, 0, 1), kv, should_cancel=lambda: True) is None
    )
    calls = []

    def cancel_at_second_layer() -> bool:
        calls.append(1)
        return len(calls) >= 3  # before the run, before layer 1 pass; before layer 2 cancels

    out = model(
        torch.tensor([5]), torch.tensor([3]), seq_rows(1, 0, 1), kv, should_cancel=cancel_at_second_layer
    )
    assert out is None and len(calls) == 3
    assert kv.used_cells() == 3
    logits = model(torch.tensor([5]), torch.tensor([3]), seq_rows(1, 0, 1), kv, should_cancel=lambda: False)
    torch.testing.assert_close(logits, full_logits(model, [*PROMPT[:3], 5])[-1:], atol=ATOL, rtol=0)


def test_stage_rejects_mismatched_inputs(weights, model):
    middle = build_tiny_stage(weights, 1, 3)
    with pytest.raises(ValueError, match=r"hidden states \[n, 64\]"):
        middle(torch.tensor([1, 2]), torch.tensor([0, 1]), seq_rows(2, 0, 1), middle.make_kv_cache(8))
    with pytest.raises(ValueError, match="does not fit stage"):
        model(torch.tensor([1]), torch.tensor([0]), seq_rows(1, 0, 1), middle.make_kv_cache(8))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\)"):
        model(torch.tensor([256]), torch.tensor([0]), seq_rows(1, 0, 1), model.make_kv_cache(8))


# ---------------------------------------------------------------------------- GGUF round trip


def write_tiny_gguf(path, weights, config: LlamaConfig) -> None:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(config.n_layers)
    writer.add_context_length(128)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.d_ffn)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(config.vocab_size)
    for name, tensor in weights.items():
        writer.add_tensor(name, tensor.numpy())
    extra = weights["blk.0.ffn_up.weight"].numpy()
    writer.add_tensor(
        "extra.q8",
        gguf.quants.quantize(extra, gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0,
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_round_trip_gives_the_same_model(tmp_path, weights):
    from pipesim.models.gguf_loader import load_gguf_stage, load_gguf_weights, read_llama_config

    config = tiny_config()
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, weights, config)
    loaded_config = read_llama_config(path)
    assert loaded_config == replace(
        config, rope_theta=50000.0, rms_norm_eps=loaded_config.rms_norm_eps, name="tiny"
    )
    assert loaded_config.rms_norm_eps == pytest.approx(1e-6)
    tail = load_gguf_stage(path, 2, 4)
    assert tail.tensor_names()[0] == "blk.2.attn_norm.weight"
    reference_model = LlamaStage.from_weights(loaded_config, weights)
    reference = full_logits(reference_model, PROMPT)
    torch.testing.assert_close(full_logits(load_gguf_stage(path), PROMPT), reference, atol=ATOL, rtol=0)
    q8 = load_gguf_weights(path, ["extra.q8"])["extra.q8"]
    original = weights["blk.0.ffn_up.weight"]
    assert q8.shape == original.shape and q8.dtype == torch.float32
    assert (q8 - original).abs().max() < 0.02 * original.abs().max()


def test_gguf_errors_name_the_path(tmp_path):
    from pipesim.models.gguf_loader import GGUFFormatError, open_gguf

    with pytest.raises(FileNotFoundError, match="GGUF file not found: .*missing.gguf"):
        open_gguf(tmp_path / "missing.gguf")
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFFormatError, match=r"not a GGUF file: .*bogus.gguf"):
        open_gguf(bogus)
