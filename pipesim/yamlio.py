"""Reading YAML (and JSON) files people write: duplicate keys are errors, and every problem is one line naming the file
(with the line and column of a syntax error)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


class YAMLFileError(ValueError):
    """A YAML file that cannot be read; the message is one line naming the file and what was wrong."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                first = seen[key].start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first.line + 1})", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _where(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def parse_yaml(text: str, source: str) -> Any:
    """The document in ``text`` (``source`` names it in errors)."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise YAMLFileError(f"{source}: not valid YAML ({_where(error)})") from None


def read_text(path: str | Path, what: str = "file") -> str:
    """A text file's contents; YAMLFileError names the file if it is missing, a folder, binary or not UTF-8."""
    path = Path(path)
    if path.is_dir():
        raise YAMLFileError(f"{path}: is a folder, expected a {what}")
    if not path.is_file():
        raise YAMLFileError(f"{what} not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise YAMLFileError(f"{path}: cannot read it ({error.strerror or error})") from None
    if b"\0" in data[:8192]:
        raise YAMLFileError(f"{path}: a binary file, expected a {what} (text)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise YAMLFileError(f"{path}: not UTF-8 text (byte {error.start}), expected a {what}") from None


def read_yaml(path: str | Path, what: str = "file") -> Any:
    """Read a YAML file; YAMLFileError names the file if it is missing, a folder, not text, or not valid YAML."""
    return parse_yaml(read_text(path, what), str(path))


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read a JSON file; YAMLFileError names the file and, for a syntax error, its line and column."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise YAMLFileError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") \
            from None
