"""Studies: a base scenario plus axes, expanded into the validated scenarios of every point.

A study file (YAML)::

    name: bandwidth
    base: ../paper-8node-cpu.yaml          # path relative to the study file, or an inline scenario mapping
    set: {workload.generate_tokens: 96}     # fixed overrides of the base
    axes:                                   # cartesian product, in this order
      network.bandwidth: [10Mbit/s, 100Mbit/s, 1Gbit/s]
      strategy.name: [iterative, speculative, pipeinfer]
    zip:                                    # keys varied together: one composite axis per group
      - {cluster.count: [2, 4], network.latency: [50us, 100us]}
    variants:                               # named override sets: one axis called "variant"
      uniform: {}
      slow-n3: {cluster.overrides: [{index: 3, flops: 100G}]}
    representative: {network.bandwidth: 1Gbit/s}   # the point whose traces the report shows
    report: {x: network.bandwidth}                 # optional hints for the report

An axis' values may be a list or a generator: ``{logspace: [10, 100000], num: 9, unit: Mbit/s}``,
``{linspace: [0.1, 0.9], num: 9}`` or ``{range: [2, 17, 2]}``. When a point changes ``cluster.count`` and
does not set ``placement.layer_split``, the split is dropped so the layers are spread evenly.
"""

from __future__ import annotations

import copy
import itertools
import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..scenario import Scenario, ScenarioError, load_scenario_document, scenario_from_dict
from ..yamlio import YAMLFileError, read_yaml

VARIANT = "variant"
COUNT_KEY = "cluster.count"
SPLIT_KEY = "placement.layer_split"
STRATEGY_KEY = "strategy.name"


class StudyFile(BaseModel):
    """The raw study document (structure only; values are checked when scenarios are built)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "study"
    description: str = ""
    base: str | dict[str, Any] = Field(description="scenario file (relative to the study) or inline scenario")
    set: dict[str, Any] = Field(default_factory=dict, description="fixed overrides of the base")
    axes: dict[str, Any] = Field(default_factory=dict, description="dotted key -> list of values")
    zip: list[dict[str, list[Any]]] = Field(default_factory=list, description="groups varied together")
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict, description="name -> overrides")
    representative: dict[str, Any] = Field(default_factory=dict, description="axis values of the shown point")
    report: dict[str, Any] = Field(default_factory=dict, description="hints: x, facet, baseline")


@dataclass(frozen=True)
class Axis:
    """One dimension of the study: ``keys`` set together, one label per value."""

    name: str
    keys: tuple[str, ...]
    labels: tuple[str, ...]
    settings: tuple[dict[str, Any], ...]  # per value: dotted key -> value

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Point:
    """One point of a study: its labels per axis, the overrides it applies and its validated scenario."""

    index: int
    labels: dict[str, str]
    overrides: dict[str, Any]
    scenario: Scenario

    @property
    def document(self) -> dict[str, Any]:
        return self.scenario.model_dump(mode="json")


@dataclass(frozen=True)
class Study:
    """A loaded study: its file, the base document (with ``set`` applied) and its axes."""

    spec: StudyFile
    source: str
    base_document: dict[str, Any]
    axes: tuple[Axis, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def axis_names(self) -> list[str]:
        return [axis.name for axis in self.axes]

    @property
    def n_points(self) -> int:
        return int(np.prod([len(axis) for axis in self.axes])) if self.axes else 1

    def points(self) -> list[Point]:
        """Every point of the cartesian product of the axes, validated, in study order."""
        return list(self.iter_points())

    def iter_points(self) -> Iterator[Point]:
        """The points one at a time, in study order (a sweep of any size holds only the ones in flight)."""
        combos = itertools.product(*[range(len(axis)) for axis in self.axes])
        for index, combo in enumerate(combos):
            labels: dict[str, str] = {}
            overrides: dict[str, Any] = {}
            for axis, i in zip(self.axes, combo, strict=True):
                labels[axis.name] = axis.labels[i]
                overrides.update(axis.settings[i])
            scenario = self._build(overrides, "point " + ", ".join(f"{k}={v}" for k, v in labels.items()))
            yield Point(index, labels, overrides, scenario)

    @cached_property
    def _base_pickle(self) -> bytes:
        return pickle.dumps(self.base_document, protocol=pickle.HIGHEST_PROTOCOL)

    def base_scenario(self) -> Scenario:
        return self._build({}, "base scenario")

    def _build(self, overrides: dict[str, Any], where: str) -> Scenario:
        document = pickle.loads(self._base_pickle)  # a deep copy, several times faster than copy.deepcopy
        try:
            apply_settings(document, overrides)
            if COUNT_KEY in overrides and SPLIT_KEY not in overrides and SPLIT_KEY not in self.spec.set:
                document.get("placement", {}).pop("layer_split", None)
            document["name"] = self.spec.name
            return scenario_from_dict(document)
        except ScenarioError as error:
            message = str(error).replace("Extra inputs are not permitted", "unknown scenario field")
            raise ScenarioError(f"{self.source}: {where}: {message}") from None

    def to_json(self) -> dict[str, Any]:
        """What the sweep records about the study (for the report's configuration table)."""
        return {"name": self.name, "description": self.spec.description, "source": self.source,
                "base": self.spec.base if isinstance(self.spec.base, str) else "(inline)",
                "set": self.spec.set, "axes": [{"name": a.name, "keys": list(a.keys), "labels": list(a.labels)}
                                               for a in self.axes],
                "representative": self.spec.representative, "report": self.spec.report,
                "base_document": self.base_document}


# -- documents ------------------------------------------------------------------------------------

def set_dotted(document: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping, creating sections as needed."""
    parts = key.split(".")
    node = document
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ScenarioError(f"{key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def get_dotted(document: dict[str, Any], key: str) -> Any:
    """Read ``a.b.c`` from a nested mapping (None when absent)."""
    node: Any = document
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def apply_settings(document: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    for key, value in settings.items():
        set_dotted(document, key, value)
    return document


def format_label(value: Any) -> str:
    """An axis value as a short label: strings as written, numbers plainly, structures as flow YAML."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return _plain_number(float(value)) if isinstance(value, float) else str(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()


def _plain_number(value: float) -> str:
    return np.format_float_positional(value, precision=4, unique=True, fractional=False, trim="-")


# -- axis values ----------------------------------------------------------------------------------

def expand_values(key: str, spec: Any) -> list[Any]:
    """An axis' values from a list or a generator mapping (logspace, linspace, range)."""
    if isinstance(spec, list):
        if not spec:
            raise ScenarioError(f"axes.{key}: needs at least one value")
        return spec
    if not isinstance(spec, dict):
        raise ScenarioError(f"axes.{key}={spec!r}: expected a list of values or a generator "
                            "({logspace: [a, b], num: n}, {linspace: [a, b], num: n}, {range: [a, b, step]})")
    kinds = [k for k in ("logspace", "linspace", "range") if k in spec]
    unknown = set(spec) - {"logspace", "linspace", "range", "num", "unit"}
    if len(kinds) != 1 or unknown:
        raise ScenarioError(f"axes.{key}={spec!r}: give exactly one of logspace, linspace, range "
                            "(with num, unit)")
    kind = kinds[0]
    bounds = spec[kind]
    try:
        if kind == "range":
            values: list[Any] = list(range(*[int(b) for b in bounds]))
        else:
            start, stop = (float(b) for b in bounds)
            num = int(spec.get("num", 5))
            if kind == "logspace" and (start <= 0 or stop <= 0):
                raise ValueError("logspace bounds must be > 0")
            grid = np.geomspace(start, stop, num) if kind == "logspace" else np.linspace(start, stop, num)
            values = [float(_plain_number(float(v))) for v in grid]
    except (TypeError, ValueError) as error:
        raise ScenarioError(f"axes.{key}.{kind}={bounds!r}: {error}") from None
    if not values:
        raise ScenarioError(f"axes.{key}={spec!r}: generates no values")
    unit = spec.get("unit")
    if unit:
        values = [f"{_plain_number(float(v))}{unit}" for v in values]
    return values


def _build_axes(spec: StudyFile, source: str) -> tuple[Axis, ...]:
    axes: list[Axis] = []
    for key, values_spec in spec.axes.items():
        try:
            values = expand_values(key, values_spec)
        except ScenarioError as error:
            raise ScenarioError(f"{source}: {error}") from None
        axes.append(Axis(key, (key,), tuple(format_label(v) for v in values),
                         tuple({key: v} for v in values)))
    for number, group in enumerate(spec.zip):
        if not group:
            raise ScenarioError(f"{source}: zip[{number}] is empty")
        lengths = {key: len(values) for key, values in group.items()}
        if len(set(lengths.values())) != 1:
            raise ScenarioError(f"{source}: zip[{number}] lists differ in length: "
                                + ", ".join(f"{k} has {n}" for k, n in lengths.items()))
        keys = tuple(group)
        n = next(iter(lengths.values()))
        settings = tuple({key: group[key][i] for key in keys} for i in range(n))
        labels = tuple(" / ".join(format_label(s[key]) for key in keys) for s in settings)
        axes.append(Axis("+".join(keys), keys, labels, settings))
    if spec.variants:
        keys = tuple(dict.fromkeys(k for overrides in spec.variants.values() for k in overrides))
        axes.append(Axis(VARIANT, keys, tuple(spec.variants), tuple(spec.variants.values())))
    names = [key for axis in axes for key in axis.keys]
    duplicates = sorted({k for k in names if names.count(k) > 1})
    if duplicates:
        raise ScenarioError(f"{source}: {', '.join(duplicates)} varied by more than one axis")
    clashes = sorted(set(names) & set(spec.set))
    if clashes:
        raise ScenarioError(f"{source}: {', '.join(clashes)} is both an axis and in set")
    return tuple(axes)


def _format_study_error(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            known = ", ".join(StudyFile.model_fields)
            problems.append(f"{location}: unknown study field (known: {known})")
        elif item["type"] == "missing":
            problems.append(f"{location}: missing required field")
        else:
            problems.append(f"{location}={item.get('input')!r}: {item['msg']}")
    return "; ".join(problems)


def study_from_dict(document: Any, source: str = "study", root: Path | None = None,
                    extra_set: dict[str, Any] | None = None) -> Study:
    """Check a study document, read its base scenario, and validate every axis value on the base."""
    if not isinstance(document, dict):
        raise ScenarioError(f"{source}: a study must be a YAML mapping")
    if "models" in document and "axes" not in document:
        raise ScenarioError(f"{source}: this is a scenario, not a study (a study has base and axes): simulate it "
                            f"with `pipesim simulate {source}`, or name it as the base of a study")
    try:
        spec = StudyFile.model_validate(document)
    except ValidationError as error:
        raise ScenarioError(f"{source}: {_format_study_error(error)}") from None
    if isinstance(spec.base, str):
        base_path = (root or Path.cwd()) / spec.base
        base = load_scenario_document(base_path)
    else:
        base = copy.deepcopy(spec.base)
    if extra_set:
        spec = spec.model_copy(update={"set": {**spec.set, **extra_set}})
    try:
        apply_settings(base, spec.set)
    except ScenarioError as error:
        raise ScenarioError(f"{source}: set: {error}") from None
    if COUNT_KEY in spec.set and SPLIT_KEY not in spec.set:
        base.get("placement", {}).pop("layer_split", None)
    study = Study(spec, source, base, _build_axes(spec, source))
    study.base_scenario()
    for axis in study.axes:  # each value on the base alone: the clearest error for a bad value
        for label, settings in zip(axis.labels, axis.settings, strict=True):
            study._build(settings, f"axis {axis.name}={label}")
    axes = {axis.name: axis for axis in study.axes}
    for name, value in spec.representative.items():
        if name not in axes:
            raise ScenarioError(f"{source}: representative.{name}: not an axis ({', '.join(axes) or 'none'})")
        if format_label(value) not in axes[name].labels:
            raise ScenarioError(f"{source}: representative.{name}={format_label(value)!r}: not one of the axis "
                                f"values ({', '.join(axes[name].labels)})")
    return study


def load_study(path: str | Path, extra_set: dict[str, Any] | None = None) -> Study:
    """Read a study YAML file (the base scenario path is relative to it)."""
    path = Path(path)
    try:
        document = read_yaml(path, "study file")
    except YAMLFileError as error:
        raise ScenarioError(str(error)) from None
    return study_from_dict(document, str(path), path.parent, extra_set)


def parse_set_options(assignments: list[str]) -> dict[str, Any]:
    """``key=value`` strings (values read as YAML) as a mapping."""
    settings: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key.strip():
            raise ScenarioError(f"--set expects dotted.key=value, got {assignment!r}")
        settings[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return settings
