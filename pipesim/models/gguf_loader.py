"""Load Llama-family weights and hyper-parameters from a GGUF file (llama.cpp's format).

Every tensor is dequantized to float32 with ``gguf.quants.dequantize``; only the tensors a stage needs are
read. Tensor names are llama.cpp's (``token_embd``, ``blk.N.attn_q``, ..., ``output_norm``, ``output``),
which are also ``LlamaStage``'s weight names. GGUF q/k weights are in llama.cpp's (Meta) row order, so
GGUF-loaded models use the ``"interleaved"`` rotary style.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipesim.models.llama import LlamaConfig, LlamaStage, stage_tensor_names

__all__ = [
    "GGUF_ROPE_STYLE",
    "GGUFFormatError",
    "field_value",
    "load_gguf_stage",
    "load_gguf_weights",
    "open_gguf",
    "read_llama_config",
]

GGUF_ROPE_STYLE = "interleaved"
SUPPORTED_ARCHITECTURES = ("llama",)
_MISSING = object()


class GGUFFormatError(ValueError):
    """The file is not a GGUF file, or lacks what a Llama model needs."""


def open_gguf(path: str | Path) -> Any:
    """Open ``path`` with ``gguf.GGUFReader`` (memory-mapped); one-line errors name the path."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise GGUFFormatError(f"not a GGUF file: {path} (starts with {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises assorted errors on truncated/corrupt files
        raise GGUFFormatError(f"cannot read GGUF file {path}: {type(exc).__name__}: {exc}") from None


def _as_reader(source: Any) -> Any:
    return open_gguf(source) if isinstance(source, str | Path) else source


def field_value(reader: Any, key: str, default: Any = _MISSING) -> Any:
    """Value of metadata ``key`` (scalars as Python numbers/str/bool, arrays as lists)."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise GGUFFormatError(f"GGUF metadata lacks {key!r}")
        return default
    if hasattr(field, "contents"):
        return field.contents()
    # Older gguf releases: decode the parts by hand.
    import gguf

    def decode(index: int, value_type: Any) -> Any:
        part = field.parts[index]
        if value_type == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    main = field.types[0]
    if main == gguf.GGUFValueType.ARRAY:
        return [decode(i, field.types[-1]) for i in field.data]
    return decode(field.data[0], main)


def read_llama_config(source: str | Path | Any, rope_style: str = GGUF_ROPE_STYLE) -> LlamaConfig:
    """Hyper-parameters from the ``<arch>.*`` metadata; tied embeddings when there is no ``output`` tensor."""
    reader = _as_reader(source)
    arch = field_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFFormatError(
            f"unsupported GGUF architecture {arch!r} (supported: {SUPPORTED_ARCHITECTURES})"
        )
    tensor_names = {t.name for t in reader.tensors}
    vocab_size = field_value(reader, f"{arch}.vocab_size", None)
    if vocab_size is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab_size = len(tokens.data) if tokens is not None else _tensor(reader, "token_embd.weight").shape[1]
    n_heads = int(field_value(reader, f"{arch}.attention.head_count"))
    rope_dims = field_value(reader, f"{arch}.rope.dimension_count", None)
    d_model = int(field_value(reader, f"{arch}.embedding_length"))
    if rope_dims is not None and int(rope_dims) != d_model // n_heads:
        raise GGUFFormatError(
            f"partial rotary embedding ({arch}.rope.dimension_count={rope_dims}) is not supported"
        )
    return LlamaConfig(
        n_layers=int(field_value(reader, f"{arch}.block_count")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(field_value(reader, f"{arch}.attention.head_count_kv", n_heads)),
        d_ffn=int(field_value(reader, f"{arch}.feed_forward_length")),
        vocab_size=int(vocab_size),
        tied_embeddings="output.weight" not in tensor_names,
        rope_theta=float(field_value(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(field_value(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_style=rope_style,
        name=str(field_value(reader, "general.name", arch)),
    )


def _tensor(reader: Any, name: str) -> Any:
    for tensor in reader.tensors:
        if tensor.name == name:
            return tensor
    raise GGUFFormatError(f"GGUF file lacks tensor {name!r}")


def load_gguf_weights(
    source: str | Path | Any, names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Dequantize the named tensors (all when ``names`` is None) to float32 torch tensors."""
    import gguf

    reader = _as_reader(source)
    by_name = {t.name: t for t in reader.tensors}
    wanted = list(by_name) if names is None else list(names)
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise GGUFFormatError(f"GGUF file lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    weights: dict[str, torch.Tensor] = {}
    for name in wanted:
        tensor = by_name[name]
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        # numpy shape is the reverse of GGUF's ne order: [rows=out, cols=in], as torch's Linear expects.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        weights[name] = torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))
    return weights


def load_gguf_stage(
    source: str | Path | Any,
    layer_start: int = 0,
    layer_end: int | None = None,
    has_embedding: bool | None = None,
    has_output_head: bool | None = None,
    rope_style: str = GGUF_ROPE_STYLE,
) -> LlamaStage:
    """Build one stage (by default the whole model) from a GGUF path or open reader, reading only its tensors.

    Opening a file parses all its metadata (seconds for a 49k-token vocabulary); pass one reader from
    ``open_gguf`` to build several stages or the tokenizer from the same file.
    """
    reader = _as_reader(source)
    config = read_llama_config(reader, rope_style=rope_style)
    layer_end = config.n_layers if layer_end is None else layer_end
    has_embedding = layer_start == 0 if has_embedding is None else has_embedding
    has_output_head = layer_end == config.n_layers if has_output_head is None else has_output_head
    names = stage_tensor_names(config, layer_start, layer_end, has_embedding, has_output_head)
    stage = LlamaStage(config, layer_start, layer_end, has_embedding, has_output_head)
    stage.load_weights(load_gguf_weights(reader, names))
    return stage
