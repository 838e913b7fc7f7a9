"""The shape of a decoder-only transformer (dense or mixture-of-experts) and weight quantizations.

Enough to cost a model (FLOPs and bytes per layer), size its messages and its memory; the executor builds tiny
models of the same form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

# Bits per weight of common GGUF quantizations (llama.cpp's reported averages, incl. scales).
QUANTIZATION_BITS: dict[str, float] = {
    "f32": 32.0,
    "f16": 16.0,
    "bf16": 16.0,
    "q8_0": 8.5,
    "q6_k": 6.5625,
    "q5_k_m": 5.69,
    "q4_k_m": 4.85,
    "q4_0": 4.5,
    "q3_k_m": 3.91,
    "q2_k": 2.63,
}


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only transformer, enough to cost it and size its messages.

    A mixture-of-experts model has ``n_experts`` MLPs per layer of which ``experts_per_token`` run for each
    token: memory holds all of them, a token's FLOPs are those of the active ones.
    """

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ffn: int
    vocab_size: int
    gated_mlp: bool = True  # Llama's SwiGLU has 3 matrices; Falcon's GELU MLP has 2
    tied_embeddings: bool = False
    bytes_per_weight: float = 2.0  # f16 unless a quantization is applied
    attn_head_dim: int | None = None  # when it is not d_model // n_heads (e.g. Mistral-Nemo)
    n_experts: int = 1
    experts_per_token: int = 1

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim if self.attn_head_dim is not None else self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def attention_params(self) -> int:
        """Q and O projections (d_model x n_heads·head_dim each), K and V (d_model x kv_dim each)."""
        return 2 * self.d_model * self.n_heads * self.head_dim + 2 * self.d_model * self.kv_dim

    @property
    def expert_params(self) -> int:
        """One MLP (one expert of an MoE layer)."""
        return (3 if self.gated_mlp else 2) * self.d_model * self.d_ffn

    @property
    def router_params(self) -> int:
        return self.d_model * self.n_experts if self.n_experts > 1 else 0

    @property
    def params_per_layer(self) -> int:
        """Parameters one layer holds (all experts)."""
        return self.attention_params + self.n_experts * self.expert_params + self.router_params

    @property
    def active_params_per_layer(self) -> int:
        """Parameters one token runs through in a layer (the active experts only)."""
        return self.attention_params + self.experts_per_token * self.expert_params + self.router_params

    def touched_params_per_layer(self, n_tokens: int) -> float:
        """Parameters a run of ``n_tokens`` tokens reads in a layer: attention and router, and the experts some
        token routes to, expected over uniform routing (E·(1 - (1 - k/E)^n) distinct experts)."""
        if self.n_experts <= 1:
            return float(self.params_per_layer)
        share = 1.0 - (1.0 - self.experts_per_token / self.n_experts) ** max(n_tokens, 1)
        experts = self.n_experts * share
        return self.attention_params + self.router_params + experts * self.expert_params

    @property
    def output_head_params(self) -> int:
        return self.d_model * self.vocab_size

    @property
    def n_params(self) -> int:
        embeddings = self.vocab_size * self.d_model * (1 if self.tied_embeddings else 2)
        return self.n_layers * self.params_per_layer + embeddings

    @property
    def n_active_params(self) -> int:
        embeddings = self.vocab_size * self.d_model * (1 if self.tied_embeddings else 2)
        return self.n_layers * self.active_params_per_layer + embeddings

    def quantized(self, quantization: str) -> ModelSpec:
        """The same shape stored with the named quantization (e.g. ``q3_k_m``)."""
        key = quantization.lower()
        if key not in QUANTIZATION_BITS:
            known = ", ".join(sorted(QUANTIZATION_BITS))
            raise ValueError(f"unknown quantization {quantization!r} (known: {known})")
        return replace(self, bytes_per_weight=QUANTIZATION_BITS[key] / 8.0)

    def check(self) -> ModelSpec:
        """Raise ValueError naming the first impossible figure; returns self."""
        for field_name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_ffn", "vocab_size", "n_experts",
                           "experts_per_token"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {field_name}={value!r} must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.name}: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.experts_per_token > self.n_experts:
            raise ValueError(f"{self.name}: experts_per_token={self.experts_per_token} > n_experts={self.n_experts}")
        if not (self.bytes_per_weight > 0 and math.isfinite(self.bytes_per_weight)):
            raise ValueError(f"{self.name}: bytes_per_weight={self.bytes_per_weight!r} must be > 0")
        return self
