"""The base of every configuration model: unknown fields, non-finite numbers and booleans-as-numbers refused.

YAML reads ``true`` as a boolean and pydantic would take it for 1 (``acceptance.alpha: true`` as 1.0,
``cluster.count: true`` as one node); ``.inf``/``.nan`` (and ``1e999``) would reach the engines as infinities.
Both are errors here, with the field named.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _accepts_bool(annotation: Any) -> bool:
    """Does a field's type admit a boolean (``bool`` anywhere in it, or ``Any``)?"""
    if annotation is bool or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _accepts_bool(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return any(isinstance(arg, bool) for arg in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return any(_accepts_bool(arg) for arg in typing.get_args(annotation))
    return False


def _scalar_type(annotation: Any) -> Any:
    """The element type of ``list[X]``/``tuple[X, ...]``/``dict[K, X]`` (optional or annotated), else itself."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _scalar_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else annotation
    if origin in (list, tuple, dict):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return _scalar_type(args[-1]) if args else Any
    return annotation


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, list | tuple):
        return any(isinstance(item, bool) for item in value)
    if isinstance(value, dict):
        return any(isinstance(item, bool) for item in value.values())
    return False


class StrictModel(BaseModel):
    """A configuration section: extra fields forbidden, numbers finite, booleans only where a flag is meant."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if not _has_bool(value) or info.field_name is None:
            return value
        annotation = cls.model_fields[info.field_name].annotation
        if _accepts_bool(annotation) or _accepts_bool(_scalar_type(annotation)):
            return value
        if isinstance(_scalar_type(annotation), type) and issubclass(_scalar_type(annotation), BaseModel):
            return value  # a section: its own fields check
        raise ValueError("a boolean is not accepted here (expected a number or a name)")
