"""Catalog of model shapes (Llama-family, Qwen2.5, Mistral/Mixtral and Falcon decoders) by name.

Shapes come from the models' published configs (``catalog_entries``). They drive the simulator's cost model
(FLOPs and bytes per layer), the payload sizes of messages and the memory a node needs.
"""

from __future__ import annotations

from .catalog_entries import ENTRIES
from .spec import QUANTIZATION_BITS, ModelSpec

__all__ = ["CATALOG", "QUANTIZATION_BITS", "ModelSpec", "get_model_spec"]

CATALOG: dict[str, ModelSpec] = {spec.name: spec for spec in ENTRIES}


def get_model_spec(name: str) -> ModelSpec:
    """Look a model up by name; the error lists the known names."""
    try:
        return CATALOG[name.lower()]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise ValueError(f"unknown model {name!r} (known: {known})") from None
