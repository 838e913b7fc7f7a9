"""Run every point of a study (in parallel), skip points already computed, write the tidy results table.

The folder a sweep writes::

    results.parquet, results.csv   one row per point: axis labels, resolved fields, config_key, metrics
    sweep.json                     the study, how it ran (backend, workers, timings), the label columns
    traces/                        the representative point of each strategy: Chrome JSON + raw records

A point's ``config_key`` hashes what decides its outcome: the resolved scenario (without the knobs its strategy
does not read) and the simulator's source code, so a re-run skips exactly the points whose result would not
change, and simulates each distinct configuration once even when several points share it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from .outcome import code_fingerprint, config_key, evaluate_batch, pipesim_version, resolved_fields
from .parallel import Backend, open_backend
from .study import Point, Study, get_dotted
from .traces import representative_points, write_traces

RESULTS = "results.parquet"
RESULTS_CSV = "results.csv"
SWEEP_META = "sweep.json"
FLUSH_EVERY_S = 30.0

# Axis keys and the resolved column that holds their value as a number (or normalised text).
RESOLVED_COLUMN = {
    "strategy.name": "strategy",
    "network.bandwidth": "bandwidth_bps",
    "network.latency": "latency_s",
    "cluster.count": "nodes",
    "acceptance.alpha": "alpha",
    "strategy.gamma": "gamma",
    "strategy.micro_batch": "micro_batch",
    "workload.prompt_tokens": "prompt_tokens",
    "workload.generate_tokens": "generate_tokens",
    "acceptance.seed": "acceptance_seed",
    "workload.seed": "workload_seed",
    "placement.layer_split": "layer_split",
    "cluster.overrides": "node_overrides",
}


def value_column(key: str) -> str:
    """The column holding the resolved value of a scenario key."""
    return RESOLVED_COLUMN.get(key, f"value.{key}")


@dataclass
class SweepResult:
    """What a sweep did: the table, and how many points were simulated, reused from the folder, or failed."""

    table: pd.DataFrame
    simulated: int
    reused: int
    failed: int
    wall_s: float
    backend: str
    workers: int
    out: Path

    @property
    def points_per_s(self) -> float:
        return self.simulated / self.wall_s if self.wall_s > 0 else math.inf


# -- table ---------------------------------------------------------------------------------------

def point_row(point: Point, key: str, outcome: dict[str, Any], study: Study) -> dict[str, Any]:
    """One row: point index, axis labels, config key, resolved fields, then the outcome columns."""
    row: dict[str, Any] = {"point": point.index, **point.labels, "config_key": key}
    row.update(resolved_fields(point.scenario))
    document = point.document
    for axis in study.axes:
        for k in axis.keys:
            column = value_column(k)
            if column not in row:
                value = get_dotted(document, k)
                row[column] = value if isinstance(value, int | float | str) else json.dumps(value)
    row.update(outcome)
    return row


def build_table(study: Study, points: list[Point], keys: list[str], outcomes: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The tidy table of every point whose outcome is known, in study order."""
    rows = [point_row(p, k, outcomes[k], study) for p, k in zip(points, keys, strict=True) if k in outcomes]
    table = pd.DataFrame(rows)
    util = sorted((c for c in table.columns if c.startswith("util.n")), key=lambda c: int(c[6:]))
    others = [c for c in table.columns if not c.startswith("util.n")]
    at = others.index("util_mean") if "util_mean" in others else len(others)
    return table[others[:at] + util + others[at:]]


def _write_atomic(table: pd.DataFrame, out: Path) -> None:
    for name, writer in ((RESULTS, table.to_parquet), (RESULTS_CSV, table.to_csv)):
        partial = out / f".{name}.partial"
        writer(partial, index=False)
        os.replace(partial, out / name)


def read_results(out: Path) -> pd.DataFrame:
    """The results table of a sweep folder (parquet, or the CSV copy)."""
    if (out / RESULTS).is_file():
        return pd.read_parquet(out / RESULTS)
    if (out / RESULTS_CSV).is_file():
        return pd.read_csv(out / RESULTS_CSV, keep_default_na=True)
    raise FileNotFoundError(f"no {RESULTS} or {RESULTS_CSV} in {out} (run `pipesim sweep STUDY --out {out}`)")


def read_meta(out: Path) -> dict[str, Any]:
    path = out / SWEEP_META
    return json.loads(path.read_text()) if path.is_file() else {}


def cached_outcomes(out: Path) -> dict[str, dict[str, Any]]:
    """Outcomes already in the folder, by config key (failed points are not kept: they run again)."""
    try:
        table = read_results(out)
    except FileNotFoundError:
        return {}
    if "config_key" not in table.columns:
        return {}
    labels = set(read_meta(out).get("label_columns", []))
    fixed = {"point", "config_key", *labels, *RESOLVED_COLUMN.values()}
    columns = [c for c in table.columns if c not in fixed and not c.startswith("value.")]
    outcomes: dict[str, dict[str, Any]] = {}
    for key, row in zip(table["config_key"], table[columns].to_dict("records"), strict=True):
        if not row.get("error") or (isinstance(row.get("error"), float) and math.isnan(row["error"])):
            row["error"] = ""
            outcomes[str(key)] = {k: v for k, v in row.items() if not (k.startswith("util.n") and _is_nan(v))}
    return outcomes


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


# -- running -------------------------------------------------------------------------------------

def _batches(tasks: list[tuple[str, dict[str, Any]]], workers: int) -> Iterable[list[tuple[str, dict[str, Any]]]]:
    """Tasks in batches of up to 16, at least 32 batches per worker: one slow point does not hold up a batch of
    fast ones, and many tiny points do not pay a round trip each."""
    size = max(1, min(16, len(tasks) // max(1, 32 * workers)))
    for start in range(0, len(tasks), size):
        yield tasks[start:start + size]


def _run_tasks(backend: Backend, tasks: list[tuple[str, dict[str, Any]]], outcomes: dict[str, dict[str, Any]],
               progress: tqdm, flush) -> None:
    assert backend.executor is not None
    pending: set[Future] = {backend.executor.submit(evaluate_batch, batch)
                            for batch in _batches(tasks, backend.workers)}
    last_flush = time.monotonic()
    try:
        while pending:
            done, pending = wait(pending, timeout=FLUSH_EVERY_S, return_when=FIRST_COMPLETED)
            for future in done:
                for key, outcome in future.result():
                    outcomes[key] = outcome
                    progress.update(1)
            if time.monotonic() - last_flush > FLUSH_EVERY_S:
                flush()
                last_flush = time.monotonic()
    except BaseException:
        for future in pending:
            future.cancel()
        flush()  # keep what is done: a re-run skips it
        raise


def run_sweep(study: Study, out: str | Path, jobs: int | None = None, force: bool = False,
              progress: bool = True, traces: bool = True) -> SweepResult | None:
    """Run a study into ``out``; returns None on MPI worker ranks, which only serve tasks."""
    out = Path(out)
    points = study.points()
    code = code_fingerprint()
    keys = [config_key(p.scenario, code) for p in points]
    started = time.perf_counter()
    with open_backend(jobs) as backend:
        if backend.executor is None:
            return None
        out.mkdir(parents=True, exist_ok=True)
        known = {} if force else cached_outcomes(out)
        outcomes = {k: v for k, v in known.items() if k in set(keys)}
        reused = len(outcomes)
        documents = {k: p.scenario.model_dump(mode="json") for p, k in zip(points, keys, strict=True)
                     if k not in outcomes}
        tasks = list(documents.items())
        meta = {"study": study.to_json(), "label_columns": study.axis_names, "pipesim": pipesim_version(),
                "code_fingerprint": code,
                "backend": backend.kind, "workers": backend.workers, "points": len(points),
                "unique_configurations": len(set(keys)), "simulated": len(tasks), "reused": len(outcomes),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}

        def flush() -> None:
            _write_atomic(build_table(study, points, keys, outcomes), out)
            (out / SWEEP_META).write_text(json.dumps(meta, indent=1, default=str))

        description = f"{study.name}: {len(points)} points, {len(tasks)} to simulate ({backend.kind} x{backend.workers})"
        hide = None if progress else True  # None: tqdm shows the bar only on a terminal
        with tqdm(total=len(tasks), desc=description, unit="sim", disable=hide,
                  leave=True, dynamic_ncols=True) as bar:
            if tasks:
                _run_tasks(backend, tasks, outcomes, bar, flush)
    wall = time.perf_counter() - started
    table = build_table(study, points, keys, outcomes)
    failed = int((table["error"].fillna("") != "").sum()) if "error" in table else 0
    meta.update(wall_s=wall, failed=failed)
    chosen = representative_points(study, points)
    meta["representatives"] = {s: {"point": p.index, "labels": p.labels} for s, p in chosen.items()}
    if traces:
        write_traces(out, chosen, code)
    _write_atomic(table, out)
    (out / SWEEP_META).write_text(json.dumps(meta, indent=1, default=str))
    return SweepResult(table, len(tasks), reused, failed, wall, backend.kind,
                       backend.workers, out)
