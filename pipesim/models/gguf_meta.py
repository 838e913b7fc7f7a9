"""Fast read of a GGUF file's metadata (key/value header only), for checks before any rank starts.

``gguf.GGUFReader`` parses every tensor and array (seconds for a vocabulary of 50k tokens); checking a
scenario only needs a few scalars, so this walks the header with ``struct`` and keeps scalars and array lengths.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class ArrayInfo(int):
    """An array value, kept as its length."""


def read_gguf_metadata(path: str | Path, tensor_names: bool = False) -> dict[str, Any]:
    """Metadata of a GGUF file: scalars and strings as values, arrays as ``ArrayInfo`` (their length).

    ``tensor_names=True`` adds the names of the file's tensors (from the tensor index, no data read) under the
    key ``"tensors"``."""
    path = Path(path)
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ValueError(f"not a GGUF file: {path} (starts with {bytes(data[:4])!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} of {path} is not supported (need >= 2)")
        at = 24

        def string(offset: int) -> tuple[str, int]:
            (length,) = struct.unpack_from("<Q", data, offset)
            return data[offset + 8:offset + 8 + length].decode("utf-8", "replace"), offset + 8 + length

        def value(kind: int, offset: int) -> tuple[Any, int]:
            if kind in _SCALARS:
                fmt = _SCALARS[kind]
                return struct.unpack_from(fmt, data, offset)[0], offset + struct.calcsize(fmt)
            if kind == _STRING:
                return string(offset)
            if kind == _ARRAY:
                item_kind, count = struct.unpack_from("<IQ", data, offset)
                offset += 12
                if item_kind in _SCALARS:
                    offset += count * struct.calcsize(_SCALARS[item_kind])
                else:
                    for _ in range(count):
                        _, offset = value(item_kind, offset)
                return ArrayInfo(count), offset
            raise ValueError(f"{path}: unknown GGUF value type {kind}")

        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, at = string(at)
            (kind,) = struct.unpack_from("<I", data, at)
            metadata[key], at = value(kind, at + 4)
        if tensor_names:
            names = []
            for _ in range(n_tensors):
                name, at = string(at)
                (n_dims,) = struct.unpack_from("<I", data, at)
                at += 4 + 8 * n_dims + 4 + 8  # dims, type, offset
                names.append(name)
            metadata["tensors"] = names
        return metadata


def llama_shape(path: str | Path) -> tuple[int, int]:
    """(layers, vocabulary size) of a Llama-family GGUF file."""
    meta = read_gguf_metadata(path)
    arch = meta.get("general.architecture", "llama")
    if f"{arch}.block_count" not in meta:
        raise ValueError(f"{path}: GGUF metadata lacks {arch}.block_count")
    vocab = meta.get(f"{arch}.vocab_size", meta.get("tokenizer.ggml.tokens", 0))
    return int(meta[f"{arch}.block_count"]), int(vocab)
