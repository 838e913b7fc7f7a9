"""Catalog of model shapes (Llama-family and Falcon decoders) and weight quantizations.

Shapes come from the models' published configs. They drive the simulator's cost model (FLOPs and
bytes per layer) and the payload sizes of messages; the executor builds tiny models of the same form.
"""

from __future__ import annotations

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
    """Shape of a decoder-only transformer, enough to cost it and size its messages."""

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

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def params_per_layer(self) -> int:
        attention = 2 * self.d_model * self.d_model + 2 * self.d_model * self.kv_dim
        mlp = (3 if self.gated_mlp else 2) * self.d_model * self.d_ffn
        return attention + mlp

    @property
    def output_head_params(self) -> int:
        return self.d_model * self.vocab_size

    @property
    def n_params(self) -> int:
        embeddings = self.vocab_size * self.d_model * (1 if self.tied_embeddings else 2)
        return self.n_layers * self.params_per_layer + embeddings

    def quantized(self, quantization: str) -> ModelSpec:
        """The same shape stored with the named quantization (e.g. ``q3_k_m``)."""
        key = quantization.lower()
        if key not in QUANTIZATION_BITS:
            known = ", ".join(sorted(QUANTIZATION_BITS))
            raise ValueError(f"unknown quantization {quantization!r} (known: {known})")
        return replace(self, bytes_per_weight=QUANTIZATION_BITS[key] / 8.0)


CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("llama-2-7b", 32, 4096, 32, 32, 11008, 32000),
        ModelSpec("llama-2-13b", 40, 5120, 40, 40, 13824, 32000),
        ModelSpec("llama-2-70b", 80, 8192, 64, 8, 28672, 32000),
        ModelSpec("llama-3.1-8b", 32, 4096, 32, 8, 14336, 128256),
        ModelSpec("llama-3.1-70b", 80, 8192, 64, 8, 28672, 128256),
        ModelSpec("llama-3.2-1b", 16, 2048, 32, 8, 8192, 128256, tied_embeddings=True),
        ModelSpec("llama-3.2-3b", 28, 3072, 24, 8, 8192, 128256, tied_embeddings=True),
        ModelSpec("tinyllama-1.1b", 22, 2048, 32, 4, 5632, 32000),
        ModelSpec("falcon-7b", 32, 4544, 71, 1, 18176, 65024, gated_mlp=False),
        ModelSpec("falcon-180b", 80, 14848, 232, 8, 59392, 65024, gated_mlp=False),
        ModelSpec("smollm2-135m", 30, 576, 9, 3, 1536, 49152, tied_embeddings=True),
        # Tiny random-weight model of the same architecture, for fast tests of the executor.
        ModelSpec("tiny-llama", 4, 64, 4, 2, 128, 256, tied_embeddings=False, bytes_per_weight=4.0),
    ]
}


def get_model_spec(name: str) -> ModelSpec:
    """Look a model up by name; the error lists the known names."""
    try:
        return CATALOG[name.lower()]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise ValueError(f"unknown model {name!r} (known: {known})") from None
