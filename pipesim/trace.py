"""The trace: the records both engines write, and its export to Chrome/Perfetto trace JSON.

The record vocabulary (``Record``, ``RecordKind``: launch, compute, dispatch, skip, transfer, cancel_sent,
cancel_seen, invalidate, tokens) lives in ``pipesim.scheduling.records``, next to the driver and the stage machine
that emit most of it; a trace's JSON carries ``format`` (``TRACE_FORMAT``), and traces of format 1 (free-text
notes) still load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .scheduling.records import TRACE_FORMAT, Record, RecordKind, legacy_record

__all__ = ["TRACE_FORMAT", "Record", "RecordKind", "Trace", "to_chrome_trace", "write_chrome_trace"]


@dataclass
class Trace:
    """Everything one engine run produced: its records plus what they are about."""

    engine: str  # "simulated" or "measured"
    strategy: str
    scenario: str
    nodes: list[str]
    t_start: float = 0.0
    t_end: float = 0.0
    records: list[Record] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    # a simulation that kept no records (``records`` empty): its metrics' tally (``pipesim.metrics.MetricsTally``)
    summary: Any = None

    def of_kind(self, kind: str) -> list[Record]:
        return [r for r in self.records if r.kind == kind]

    def to_frame(self):
        """The records as a pandas DataFrame (one row per record)."""
        import pandas as pd

        return pd.DataFrame.from_records([(str(r[0]), *r[1:]) for r in self.records], columns=Record._fields)

    def to_json(self) -> dict[str, Any]:
        return {"format": TRACE_FORMAT, "engine": self.engine, "strategy": self.strategy, "scenario": self.scenario,
                "nodes": self.nodes, "t_start": self.t_start, "t_end": self.t_end,
                "records": [[str(r[0]), *r[1:]] for r in self.records],
                "output_tokens": self.output_tokens, "meta": self.meta}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Trace:
        return cls(engine=data["engine"], strategy=data["strategy"], scenario=data["scenario"],
                   nodes=list(data["nodes"]), t_start=data["t_start"], t_end=data["t_end"],
                   records=records_from_json(data), output_tokens=list(data.get("output_tokens", [])),
                   meta=dict(data.get("meta", {})))


def records_from_json(data: dict[str, Any]) -> list[Record]:
    """The records of a trace's JSON (either format)."""
    if data.get("format", "pipesim-trace/1") == TRACE_FORMAT:
        return [Record(RecordKind(r[0]), *r[1:]) for r in data["records"]]
    return [legacy_record(r) for r in data["records"]]


def record_label(r: Record) -> str:
    """A short name for a record in a timeline: ``stage2``, ``stage2 (aborted)``, ``draft``, ``exit6``, ..."""
    if r.what == "stage":
        return f"stage{r.stage}" + (" (aborted)" if r.aborted else "")
    if r.what == "exit":
        return f"exit{r.stage}"
    return r.what or str(r.kind)


def to_chrome_trace(trace: Trace) -> dict[str, Any]:
    """Chrome/Perfetto ``traceEvents`` JSON: one process per node, one per link direction; times in µs."""
    pids: dict[str, int] = {}
    events: list[dict[str, Any]] = []

    def pid(name: str) -> int:
        if name not in pids:
            pids[name] = len(pids) + 1
            label = f"link {name}" if "->" in name else f"node {name}"
            events.append({"ph": "M", "name": "process_name", "pid": pids[name], "tid": 0, "args": {"name": label}})
            events.append({"ph": "M", "name": "process_sort_index", "pid": pids[name], "tid": 0,
                           "args": {"sort_index": pids[name]}})
        return pids[name]

    for name in trace.nodes:
        pid(name)
    origin = trace.t_start
    for r in trace.records:
        ts = (r.t0 - origin) * 1e6
        args = {"run": r.run_id, "tokens": r.n_tokens}
        if r.kind in ("compute", "transfer", "dispatch"):
            if r.nbytes:
                args["bytes"] = r.nbytes
            events.append({"ph": "X", "name": record_label(r), "cat": str(r.kind), "pid": pid(r.where), "tid": 0,
                           "ts": ts, "dur": max((r.t1 - r.t0) * 1e6, 0.0), "args": args})
        else:
            if r.kind == "tokens":
                args.update(checked=r.checked, accepted=r.accepted)
            events.append({"ph": "i", "s": "t", "name": str(r.kind), "cat": str(r.kind), "pid": pid(r.where), "tid": 0,
                           "ts": ts, "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"engine": trace.engine, "strategy": trace.strategy, "scenario": trace.scenario}}


def write_chrome_trace(trace: Trace, path: str | Path) -> Path:
    """Write the Chrome/Perfetto JSON (open it in ui.perfetto.dev or chrome://tracing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_chrome_trace(trace)))
    return path
