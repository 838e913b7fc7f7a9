"""Representative runs: one point per strategy whose full trace the report shows (timeline, ITL spread)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ..scheduling.records import legacy_record
from ..sim import simulate
from ..trace import Record, Trace, write_chrome_trace
from .folder import write_atomic, write_json_atomic
from .outcome import config_key
from .study import STRATEGY_KEY, Point, Study, format_label, get_dotted

TRACE_DIR = "traces"
INDEX_FILE = "index.json"


def _chosen_label(study: Study, axis_index: int) -> str:
    """The representative value of one axis: as asked in the study, else the base's own value, else the middle."""
    axis = study.axes[axis_index]
    asked = study.spec.representative.get(axis.name)
    if asked is not None:
        return format_label(asked)  # checked against the axis values when the study was loaded
    base = study.base_scenario().model_dump(mode="json")
    for label, settings in zip(axis.labels, axis.settings, strict=True):
        point = study._build(settings, f"axis {axis.name}={label}").model_dump(mode="json")
        if all(get_dotted(point, key) == get_dotted(base, key) for key in axis.keys):
            return label
    return axis.labels[len(axis) // 2]


def representative_labels(study: Study) -> dict[str, str]:
    """The label of every axis but the strategy at the representative points."""
    return {axis.name: _chosen_label(study, i) for i, axis in enumerate(study.axes) if axis.name != STRATEGY_KEY}


def is_representative(point: Point, chosen: dict[str, str]) -> bool:
    return all(point.labels[name] == label for name, label in chosen.items())


def representative_points(study: Study, points: Iterable[Point]) -> dict[str, Point]:
    """One point per strategy, at the same values of every other axis."""
    chosen = representative_labels(study)
    found: dict[str, Point] = {}
    for point in points:
        if is_representative(point, chosen):
            found.setdefault(point.scenario.strategy.name, point)
    return found


def write_traces(out: Path, representatives: dict[str, Point], code: str = "") -> dict[str, Any]:
    """Simulate each representative point again (the simulator is deterministic) and keep its trace:
    Chrome/Perfetto JSON and the raw records. Points whose files are already there are skipped."""
    folder = out / TRACE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / INDEX_FILE
    old = json.loads(index_path.read_text()) if index_path.is_file() else {}
    index: dict[str, Any] = {}
    for strategy, point in representatives.items():
        key = config_key(point.scenario, code)
        chrome, records = folder / f"{strategy}.chrome.json", folder / f"{strategy}.records.parquet"
        entry = old.get(strategy, {})
        if entry.get("config_key") != key or not chrome.is_file() or not records.is_file():
            trace = simulate(point.scenario)
            write_atomic(chrome, lambda path, trace=trace: write_chrome_trace(trace, path))
            write_atomic(records, lambda path, trace=trace: trace.to_frame().to_parquet(path, index=False))
            entry = {"config_key": key, "point": point.index, "labels": point.labels, "nodes": trace.nodes,
                     "engine": trace.engine, "scenario": trace.scenario, "t_start": trace.t_start,
                     "t_end": trace.t_end, "meta": trace.meta, "chrome": chrome.name, "records": records.name}
            del trace  # one representative trace in memory at a time
        index[strategy] = entry
        write_json_atomic(index_path, index)  # after each: a kill keeps the traces already written
    write_json_atomic(index_path, index)
    return index


def read_traces(out: Path) -> dict[str, tuple[dict[str, Any], Trace]]:
    """The representative traces of a sweep folder: strategy -> (index entry, trace)."""
    folder = out / TRACE_DIR
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        return {}
    traces = {}
    for strategy, entry in json.loads(index_path.read_text()).items():
        path = folder / entry["records"]
        if not path.is_file():
            continue
        frame = pd.read_parquet(path)
        make = legacy_record if "note" in frame.columns else Record._make  # format 1: free-text notes
        records = [make(row) for row in frame.itertuples(index=False, name=None)]
        trace = Trace(engine=entry["engine"], strategy=strategy, scenario=entry["scenario"],
                      nodes=list(entry["nodes"]), t_start=entry["t_start"], t_end=entry["t_end"], records=records,
                      meta=entry.get("meta", {}))
        traces[strategy] = (entry, trace)
    return traces
