"""The shapes of the model catalog, from each model's published config.json (Hugging Face model cards)."""

from __future__ import annotations

from .spec import ModelSpec

ENTRIES: list[ModelSpec] = [
    ModelSpec("llama-2-7b", 32, 4096, 32, 32, 11008, 32000),
    ModelSpec("llama-2-13b", 40, 5120, 40, 40, 13824, 32000),
    ModelSpec("llama-2-70b", 80, 8192, 64, 8, 28672, 32000),
    ModelSpec("llama-3.1-8b", 32, 4096, 32, 8, 14336, 128256),
    ModelSpec("llama-3.1-70b", 80, 8192, 64, 8, 28672, 128256),
    ModelSpec("llama-3.1-405b", 126, 16384, 128, 8, 53248, 128256),
    ModelSpec("llama-3.2-1b", 16, 2048, 32, 8, 8192, 128256, tied_embeddings=True),
    ModelSpec("llama-3.2-3b", 28, 3072, 24, 8, 8192, 128256, tied_embeddings=True),
    ModelSpec("llama-3.3-70b", 80, 8192, 64, 8, 28672, 128256),
    ModelSpec("tinyllama-1.1b", 22, 2048, 32, 4, 5632, 32000),
    ModelSpec("qwen2.5-0.5b", 24, 896, 14, 2, 4864, 151936, tied_embeddings=True),
    ModelSpec("qwen2.5-1.5b", 28, 1536, 12, 2, 8960, 151936, tied_embeddings=True),
    ModelSpec("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064),
    ModelSpec("qwen2.5-14b", 48, 5120, 40, 8, 13824, 152064),
    ModelSpec("qwen2.5-32b", 64, 5120, 40, 8, 27648, 152064),
    ModelSpec("qwen2.5-72b", 80, 8192, 64, 8, 29568, 152064),
    ModelSpec("mistral-7b", 32, 4096, 32, 8, 14336, 32768),  # Mistral-7B-v0.3
    ModelSpec("mixtral-8x7b", 32, 4096, 32, 8, 14336, 32000, n_experts=8, experts_per_token=2),
    ModelSpec("mixtral-8x22b", 56, 6144, 48, 8, 16384, 32768, n_experts=8, experts_per_token=2),
    ModelSpec("falcon-7b", 32, 4544, 71, 1, 18176, 65024, gated_mlp=False),
    ModelSpec("falcon-180b", 80, 14848, 232, 8, 59392, 65024, gated_mlp=False),
    ModelSpec("smollm2-135m", 30, 576, 9, 3, 1536, 49152, tied_embeddings=True),
    # Tiny random-weight model of the same architecture, for fast tests of the executor.
    ModelSpec("tiny-llama", 4, 64, 4, 2, 128, 256, tied_embeddings=False, bytes_per_weight=4.0),
]
