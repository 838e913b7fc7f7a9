"""A model's shape from what a user has: a catalog name, an inline mapping, a Hugging Face ``config.json`` or a
GGUF file (its metadata only: no weights are read).

``model_shape(ref)`` returns a ``ModelSpec``; every problem is a ``ValueError`` naming the file and the field.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from .catalog import CATALOG, get_model_spec
from .gguf_meta import read_gguf_metadata
from .spec import QUANTIZATION_BITS, ModelSpec

# Hugging Face model_type values whose MLP is a plain two-matrix one (no gate).
_UNGATED = {"falcon", "gpt2", "gpt_neox", "gptj", "opt", "bloom", "starcoder2", "phi"}
# GGUF general.file_type (llama.cpp's enum llama_ftype) -> the quantization of QUANTIZATION_BITS it stands for.
GGUF_FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 7: "q8_0", 10: "q2_k", 12: "q3_k_m", 15: "q4_k_m",
                   17: "q5_k_m", 18: "q6_k", 32: "bf16"}
_INLINE_FIELDS = {f.name for f in fields(ModelSpec)} | {"quantization"}


def model_shape(ref: str | dict[str, Any]) -> ModelSpec:
    """The shape named by ``ref``: a catalog name, a mapping of ModelSpec fields, a config.json or a .gguf path."""
    if isinstance(ref, dict):
        return inline_shape(ref)
    if not isinstance(ref, str):
        raise ValueError(f"a model is a catalog name, a file path or a mapping, got {type(ref).__name__}")
    if ref.lower() in CATALOG:
        return get_model_spec(ref)
    path = Path(ref).expanduser()
    if path.suffix.lower() == ".gguf" or path.suffix.lower() == ".json" or path.is_dir():
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"model file not found: {path}")
        return gguf_shape(path) if path.suffix.lower() == ".gguf" else hf_config_shape(path)
    return get_model_spec(ref)  # the catalog's error, which lists the known names


def inline_shape(mapping: dict[str, Any]) -> ModelSpec:
    """A shape given inline: ModelSpec's fields (``n_kv_heads`` defaults to ``n_heads``), optional quantization."""
    unknown = sorted(set(mapping) - _INLINE_FIELDS)
    if unknown:
        raise ValueError(f"inline model shape: unknown field {unknown[0]!r} (fields: {', '.join(sorted(_INLINE_FIELDS))})")
    values = dict(mapping)
    quantization = values.pop("quantization", None)
    values.setdefault("name", "custom")
    values.setdefault("n_kv_heads", values.get("n_heads"))
    missing = [name for name in ("n_layers", "d_model", "n_heads", "d_ffn", "vocab_size") if name not in values]
    if missing:
        raise ValueError(f"inline model shape: missing field {missing[0]!r}")
    spec = ModelSpec(**values).check()
    return spec.quantized(quantization) if quantization else spec


def hf_config_shape(path: str | Path) -> ModelSpec:
    """A shape from a Hugging Face ``config.json`` (Llama, Mistral, Mixtral, Qwen2, Falcon-style keys)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a config.json must hold a JSON object")
    config = config.get("text_config", config)  # multimodal configs nest the language model's

    def first(*keys: str, default: Any = None) -> Any:
        for key in keys:
            if config.get(key) is not None:
                return config[key]
        if default is None:
            raise ValueError(f"{path}: config lacks {keys[0]!r}")
        return default

    n_heads = int(first("num_attention_heads", "n_head"))
    d_model = int(first("hidden_size", "n_embd", "d_model"))
    model_type = str(config.get("model_type", "llama")).lower()
    gated = model_type not in _UNGATED
    d_ffn = int(first("intermediate_size", "ffn_hidden_size", "n_inner", default=4 * d_model))
    n_kv = first("num_key_value_heads", "num_kv_heads", default=n_heads)
    if model_type == "falcon" and not config.get("new_decoder_architecture") and config.get("multi_query"):
        n_kv = 1
    head_dim = config.get("head_dim")
    spec = ModelSpec(
        name=str(config.get("_name_or_path") or path.parent.name or "custom"),
        n_layers=int(first("num_hidden_layers", "n_layer", "num_layers")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        d_ffn=d_ffn,
        vocab_size=int(first("vocab_size")),
        gated_mlp=gated,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        bytes_per_weight=_hf_bytes_per_weight(config),
        attn_head_dim=int(head_dim) if head_dim and int(head_dim) != d_model // n_heads else None,
        n_experts=int(first("num_local_experts", "num_experts", default=1)),
        experts_per_token=int(first("num_experts_per_tok", default=1)),
    )
    try:
        return spec.check()
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _hf_bytes_per_weight(config: dict[str, Any]) -> float:
    dtype = str(config.get("torch_dtype") or "float16").lower()
    return 4.0 if dtype in ("float32", "fp32") else 2.0


def gguf_shape(path: str | Path) -> ModelSpec:
    """A shape from a GGUF file's metadata and tensor index (no tensor data is read); its quantization is the
    file's ``general.file_type`` where that is one of the known ones (else f16)."""
    path = Path(path)
    try:
        meta = read_gguf_metadata(path, tensor_names=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read GGUF metadata ({error})") from None
    arch = str(meta.get("general.architecture", "llama"))

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{name}")
        return value

    n_heads = int(key("attention.head_count"))
    d_model = int(key("embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size", meta.get("tokenizer.ggml.tokens"))
    if vocab is None:
        raise ValueError(f"{path}: GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    head_dim = meta.get(f"{arch}.attention.key_length")
    tensors = meta.get("tensors", [])
    quantization = GGUF_FILE_TYPES.get(int(meta.get("general.file_type", 1)), "f16")
    spec = ModelSpec(
        name=str(meta.get("general.name") or path.stem),
        n_layers=int(key("block_count")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        d_ffn=int(key("feed_forward_length")),
        vocab_size=int(vocab),
        gated_mlp=arch not in _UNGATED,
        tied_embeddings=bool(tensors) and "output.weight" not in tensors,
        bytes_per_weight=QUANTIZATION_BITS[quantization] / 8.0,
        attn_head_dim=int(head_dim) if head_dim and int(head_dim) != d_model // n_heads else None,
        n_experts=int(key("expert_count", 1)) or 1,
        experts_per_token=int(key("expert_used_count", 1)) or 1,
    )
    try:
        return spec.check()
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
