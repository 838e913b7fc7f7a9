"""Tiny random-weight Llama models for fast tests of the executor (same architecture as the real ones)."""

from __future__ import annotations

import torch

from pipesim.models.catalog import get_model_spec
from pipesim.models.llama import LAYER_TENSORS, LlamaConfig, LlamaStage

__all__ = ["build_tiny_stage", "make_tiny_model_weights", "tiny_config"]

QK_GAIN = 3.0  # extra scale of the q/k projections (attention logits grow with its square)


def tiny_config(spec_name: str = "tiny-llama", rope_style: str = "interleaved") -> LlamaConfig:
    """Config of a catalog shape with default rope/norm constants."""
    return LlamaConfig.from_spec(get_model_spec(spec_name), rope_style=rope_style)


def make_tiny_model_weights(spec_name: str = "tiny-llama", seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights, keyed by GGUF-style names, for every tensor of the model.

    Projections are N(0, 1/fan_in) so activations keep their scale, except q and k which are 3x larger so
    attention is peaked as in trained models (uniform attention makes greedy decoding loop early); the
    embedding is N(0, 1) and norm gains are near 1. Greedy continuations are varied, not one repeated token.
    """
    config = tiny_config(spec_name)
    gen = torch.Generator().manual_seed(seed)
    d, f, kv_dim = config.d_model, config.d_ffn, config.n_kv_heads * config.head_dim

    def normal(rows: int, cols: int, std: float) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) * std

    def gain(dim: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(dim, generator=gen)

    shapes = {
        "attn_q": (d, d),
        "attn_k": (kv_dim, d),
        "attn_v": (kv_dim, d),
        "attn_output": (d, d),
        "ffn_gate": (f, d),
        "ffn_up": (f, d),
        "ffn_down": (d, f),
    }
    weights = {"token_embd.weight": normal(config.vocab_size, d, 1.0)}
    for layer in range(config.n_layers):
        for tensor in LAYER_TENSORS:
            name = f"blk.{layer}.{tensor}.weight"
            if tensor in ("attn_norm", "ffn_norm"):
                weights[name] = gain(d)
            else:
                rows, cols = shapes[tensor]
                sharpen = QK_GAIN if tensor in ("attn_q", "attn_k") else 1.0
                weights[name] = normal(rows, cols, sharpen * cols**-0.5)
    weights["output_norm.weight"] = gain(d)
    if not config.tied_embeddings:
        weights["output.weight"] = normal(config.vocab_size, d, d**-0.5)
    return weights


def build_tiny_stage(
    weights: dict[str, torch.Tensor],
    layer_start: int = 0,
    layer_end: int | None = None,
    has_embedding: bool | None = None,
    has_output_head: bool | None = None,
    spec_name: str = "tiny-llama",
    rope_style: str = "interleaved",
) -> LlamaStage:
    """A stage of the tiny model (by default the whole model) loaded from ``weights``."""
    return LlamaStage.from_weights(
        tiny_config(spec_name, rope_style), weights, layer_start, layer_end, has_embedding, has_output_head
    )
