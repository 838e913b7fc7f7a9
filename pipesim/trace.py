"""The trace: event records both engines write, and its export to Chrome/Perfetto trace JSON.

A record is a flat tuple (fast to append in the simulator's hot loop):
``(kind, t0, t1, where, run_id, n_tokens, nbytes, checked, accepted, note)``. Kinds:

- ``launch``     a run is launched at the head (note: prefill/decode/verify/spec)
- ``compute``    a node computes (span); note ``stage<k>``, ``draft`` or ``verify``; ``:aborted`` when cut short
- ``dispatch``   per-run messaging and scheduling a calibrated profile charges on a node (span): the node is busy
                 but not computing, as in the executor, whose compute records cover the forward pass only
- ``skip``       a stage skips a cancelled run it had not started
- ``transfer``   a message occupies a link direction (span); note activations/header/predictions/cancel
- ``cancel_sent`` / ``cancel_seen``  early cancellation leaving the head / reaching a stage
- ``invalidate`` a run's result is no longer wanted (its compute counts as wasted)
- ``tokens``     tokens committed at the head (n_tokens), with drafted tokens checked/accepted
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple


class Record(NamedTuple):
    kind: str
    t0: float
    t1: float
    where: str
    run_id: int = -1
    n_tokens: int = 0
    nbytes: float = 0.0
    checked: int = 0
    accepted: int = 0
    note: str = ""


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

    def of_kind(self, kind: str) -> list[Record]:
        return [r for r in self.records if r.kind == kind]

    def to_frame(self):
        """The records as a pandas DataFrame (one row per record)."""
        import pandas as pd

        return pd.DataFrame.from_records(self.records, columns=Record._fields)

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "strategy": self.strategy, "scenario": self.scenario, "nodes": self.nodes,
                "t_start": self.t_start, "t_end": self.t_end, "records": [list(r) for r in self.records],
                "output_tokens": self.output_tokens, "meta": self.meta}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Trace:
        return cls(engine=data["engine"], strategy=data["strategy"], scenario=data["scenario"],
                   nodes=list(data["nodes"]), t_start=data["t_start"], t_end=data["t_end"],
                   records=[Record(*r) for r in data["records"]], output_tokens=list(data.get("output_tokens", [])),
                   meta=dict(data.get("meta", {})))


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
            events.append({"ph": "X", "name": r.note or r.kind, "cat": r.kind, "pid": pid(r.where), "tid": 0,
                           "ts": ts, "dur": max((r.t1 - r.t0) * 1e6, 0.0), "args": args})
        else:
            if r.kind == "tokens":
                args.update(checked=r.checked, accepted=r.accepted)
            events.append({"ph": "i", "s": "t", "name": r.kind, "cat": r.kind, "pid": pid(r.where), "tid": 0,
                           "ts": ts, "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"engine": trace.engine, "strategy": trace.strategy, "scenario": trace.scenario}}


def write_chrome_trace(trace: Trace, path: str | Path) -> Path:
    """Write the Chrome/Perfetto JSON (open it in ui.perfetto.dev or chrome://tracing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_chrome_trace(trace)))
    return path
