"""Run every point of a study (in parallel), skip points already computed, write the tidy results table.

The folder a sweep writes::

    results.parquet, results.csv   one row per point: axis labels, resolved fields, config_key, metrics
    sweep.json                     the study, how it ran (backend, workers, timings), the label columns
    cache.sqlite                   every simulated configuration's outcome, by config_key (see cache.py)
    traces/                        the representative point of each strategy: Chrome JSON + raw records

The sweep streams: points are built, simulated and written a window at a time, in study order, so memory does
not grow with the study. Each finished batch of points goes to the cache at once (a kill loses only the points
in flight); the table is merged from the windows' parts and replaced atomically when the points are done,
before the traces are simulated (or when the sweep is interrupted), so it never holds a row the cache does not.
One sweep writes a folder at a time (a lock), and a folder holding another study is refused.

A point's ``config_key`` hashes what decides its outcome: the resolved scenario (without the knobs its strategy
does not read) and the simulator's source code, so a re-run skips exactly the points whose result would not
change, and simulates each distinct configuration once even when several points share it.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from .cache import OutcomeCache
from .folder import check_same_study, locked_folder, prepare_folder, remove_leftovers, write_json_atomic
from .outcome import code_fingerprint, config_key, evaluate_batch, pipesim_version, resolved_fields
from .parallel import Backend, open_backend
from .study import Point, Study, get_dotted
from .tablestream import TableWriter, ordered_columns
from .traces import is_representative, representative_labels, write_traces

RESULTS = "results.parquet"
RESULTS_CSV = "results.csv"
SWEEP_META = "sweep.json"
WINDOW_POINTS = 128  # points built and written together (one part of the table)
MAX_OPEN_WINDOWS = 32  # windows waiting for their points at most (bounds memory when one point is slow)

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
    """What a sweep did: how many points, how many configurations were simulated, reused from the folder, or
    failed. ``table`` reads the results table from the folder (it is not held in memory)."""

    points: int
    simulated: int
    reused: int
    failed: int
    wall_s: float
    backend: str
    workers: int
    out: Path
    errors: list[str] = field(default_factory=list)  # a few distinct error messages of failed points

    @property
    def table(self) -> pd.DataFrame:
        return read_results(self.out)

    @property
    def points_per_s(self) -> float:
        return self.simulated / self.wall_s if self.wall_s > 0 else math.inf


class SweepInterrupted(KeyboardInterrupt):
    """The sweep process got SIGTERM or SIGHUP (SIGINT raises a plain KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the sweep like Ctrl-C: workers stopped, finished points kept."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: Any) -> None:
        raise SweepInterrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# -- table ---------------------------------------------------------------------------------------

def point_fields(point: Point, key: str, study: Study, document: dict[str, Any] | None = None) -> dict[str, Any]:
    """A row without its outcome: point index, axis labels, config key, resolved fields, axis values."""
    row: dict[str, Any] = {"point": point.index, **point.labels, "config_key": key}
    row.update(resolved_fields(point.scenario))
    document = point.document if document is None else document
    for axis in study.axes:
        for k in axis.keys:
            column = value_column(k)
            if column not in row:
                value = get_dotted(document, k)
                plain = isinstance(value, int | float | str) and not isinstance(value, bool)  # True next to "null"
                row[column] = value if plain else json.dumps(value)  # would give a column of mixed types
    return row


def point_row(point: Point, key: str, outcome: dict[str, Any], study: Study) -> dict[str, Any]:
    """One row: point index, axis labels, config key, resolved fields, then the outcome columns."""
    return {**point_fields(point, key, study), **outcome}


def build_table(study: Study, points: list[Point], keys: list[str], outcomes: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The tidy table of every point whose outcome is known, in study order, built in memory (the sweep
    streams the same table to disk instead)."""
    rows = [point_row(p, k, outcomes[k], study) for p, k in zip(points, keys, strict=True) if k in outcomes]
    table = pd.DataFrame(rows)
    return table[ordered_columns(table.columns)]


def read_results(out: Path) -> pd.DataFrame:
    """The results table of a sweep folder (parquet, or the CSV copy)."""
    out = Path(out)
    if (out / RESULTS).is_file():
        return pd.read_parquet(out / RESULTS)
    if (out / RESULTS_CSV).is_file():
        return pd.read_csv(out / RESULTS_CSV, keep_default_na=True)
    raise FileNotFoundError(f"no {RESULTS} or {RESULTS_CSV} in {out} (run `pipesim sweep STUDY --out {out}`)")


def read_meta(out: Path) -> dict[str, Any]:
    path = Path(out) / SWEEP_META
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        raise ValueError(f"{path}: not a sweep description (invalid JSON)") from None


def cached_outcomes(out: Path) -> dict[str, dict[str, Any]]:
    """Outcomes in a folder's results table, by config key (failed points are not kept: they run again); the
    cache of folders written before ``cache.sqlite`` existed."""
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

def batch_size(points: int, workers: int) -> int:
    """Points per task: up to 16, at least 32 tasks per worker, so one slow point does not hold up a batch of
    fast ones, and many tiny points do not pay a round trip each."""
    return max(1, min(16, points // max(1, 32 * workers)))


@dataclass
class _Window:
    """Consecutive points waiting for their outcomes: (config key, row without outcome) each."""

    entries: list[tuple[str, dict[str, Any]]]


class _Streamer:
    """Builds windows of points, keeps the workers fed with batches of the configurations not yet known, stores
    each finished batch in the cache, and writes each window's rows once all its points are known."""

    def __init__(self, study: Study, backend: Backend, cache: OutcomeCache, writer: TableWriter, code: str,
                 force: bool, bar: tqdm) -> None:
        self.study, self.backend, self.cache, self.writer = study, backend, cache, writer
        self.code, self.force, self.bar = code, force, bar
        self.batch = batch_size(study.n_points, backend.workers)
        self.max_in_flight = 4 * backend.workers
        self.points = iter(study.iter_points())
        self.exhausted = False
        self.windows: deque[_Window] = deque()
        self.queued: deque[list[tuple[str, dict[str, Any]]]] = deque()
        self.pending: set[str] = set()  # keys queued or in flight
        self.in_flight: dict[Future, list[str]] = {}
        self.chosen_labels = representative_labels(study)
        self.representatives: dict[str, Point] = {}
        self.written = 0
        self.failed = 0
        self.errors: list[str] = []

    def run(self) -> None:
        assert self.backend.executor is not None
        while True:
            while (not self.exhausted and len(self.queued) < self.max_in_flight
                   and len(self.windows) < MAX_OPEN_WINDOWS):
                self._open_window()
            while self.queued and len(self.in_flight) < self.max_in_flight:
                batch = self.queued.popleft()
                future = self.backend.executor.submit(evaluate_batch, batch)
                self.in_flight[future] = [key for key, _ in batch]
            self._write_ready_windows()
            if self.exhausted and not self.windows:
                return
            if self.in_flight:
                done, _ = wait(list(self.in_flight), timeout=1.0, return_when=FIRST_COMPLETED)
                for future in done:
                    keys = self.in_flight.pop(future)
                    self.cache.put(future.result())
                    self.pending.difference_update(keys)

    def _open_window(self) -> None:
        points = list(islice(self.points, WINDOW_POINTS))
        if not points:
            self.exhausted = True
            return
        entries: list[tuple[str, dict[str, Any]]] = []
        documents: dict[str, dict[str, Any]] = {}
        for point in points:
            document = point.document
            key = config_key(point.scenario, self.code)
            entries.append((key, point_fields(point, key, self.study, document)))
            documents.setdefault(key, document)
            if is_representative(point, self.chosen_labels):
                self.representatives.setdefault(point.scenario.strategy.name, point)
        fresh = [key for key in documents if key not in self.pending]
        known = self.cache.known(fresh, self.force)
        tasks = [(key, documents[key]) for key in fresh if key not in known]
        for start in range(0, len(tasks), self.batch):
            self.queued.append(tasks[start:start + self.batch])
        self.pending.update(key for key, _ in tasks)
        self.windows.append(_Window(entries))

    def _write_ready_windows(self) -> None:
        while self.windows and not any(key in self.pending for key, _ in self.windows[0].entries):
            self._write(self.windows.popleft().entries)

    def _write(self, entries: list[tuple[str, dict[str, Any]]]) -> None:
        keys = list(dict.fromkeys(key for key, _ in entries))
        outcomes = self.cache.outcomes(keys)
        rows = [{**row, **outcomes[key]} for key, row in entries if key in outcomes]
        self.writer.append(rows)
        self.cache.mark_used(keys)
        for row in rows:
            error = row.get("error")
            if error:
                self.failed += 1
                if error not in self.errors and len(self.errors) < 5:
                    self.errors.append(error)
        self.written += len(rows)
        self.bar.update(len(rows))

    def stop(self) -> None:
        """Interrupted: end the workers, then write the rows of every point already known, in order."""
        self.backend.terminate()
        for future, keys in list(self.in_flight.items()):
            if future.done() and not future.cancelled() and future.exception() is None:
                self.cache.put(future.result())
                self.pending.difference_update(keys)
        self.in_flight.clear()
        while self.windows:
            entries = self.windows.popleft().entries
            self._write([(key, row) for key, row in entries if key not in self.pending])


def _validate_all(study: Study) -> None:
    """Build every point once before any work, so a bad point is reported before hours of simulation."""
    for _ in study.iter_points():
        pass


def run_sweep(study: Study, out: str | Path, jobs: int | None = None, force: bool = False,
              progress: bool = True, traces: bool = True) -> SweepResult | None:
    """Run a study into ``out``; returns None on MPI worker ranks, which only serve tasks.

    Points already in the folder's cache are reused (``force``: simulated again). Raises ValueError (one line)
    when another sweep is writing ``out`` or ``out`` holds a different study, and KeyboardInterrupt
    (``SweepInterrupted`` for SIGTERM/SIGHUP) after keeping the finished points when interrupted."""
    out = Path(out)
    code = code_fingerprint()
    started = time.perf_counter()
    with open_backend(jobs) as backend:
        if backend.executor is None:
            return None
        prepare_folder(out)
        with locked_folder(out, study.name), _signals_interrupt():
            check_same_study(read_meta(out), out, study.name, study.axis_names, force)
            _validate_all(study)
            remove_leftovers(out)
            cache = OutcomeCache(out, run=uuid.uuid4().hex[:12])
            writer = TableWriter(out)
            try:
                return _sweep(study, out, backend, cache, writer, code, force, progress, traces, started)
            finally:
                writer.discard()
                cache.close()


def _sweep(study: Study, out: Path, backend: Backend, cache: OutcomeCache, writer: TableWriter, code: str,
           force: bool, progress: bool, traces: bool, started: float) -> SweepResult:
    if len(cache) == 0:
        cache.import_outcomes(cached_outcomes(out))  # a folder from before the cache: its table seeds it
    meta = {"study": study.to_json(), "label_columns": study.axis_names, "pipesim": pipesim_version(),
            "code_fingerprint": code, "backend": backend.kind, "workers": backend.workers,
            "points": study.n_points, "state": "running",
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(out / SWEEP_META, meta)
    description = f"{study.name}: {study.n_points} points ({backend.kind} x{backend.workers})"
    hide = None if progress else True  # None: tqdm shows the bar only on a terminal
    with tqdm(total=study.n_points, desc=description, unit="pt", disable=hide, leave=True,
              dynamic_ncols=True) as bar:
        streamer = _Streamer(study, backend, cache, writer, code, force, bar)
        try:
            streamer.run()
        except BaseException:
            streamer.stop()
            _publish(writer, out, cache, meta, streamer, started, state="interrupted")
            raise
    _publish(writer, out, cache, meta, streamer, started, state="traces" if traces else "complete")
    chosen = streamer.representatives
    meta["representatives"] = {s: {"point": p.index, "labels": p.labels} for s, p in chosen.items()}
    if traces:
        write_traces(out, chosen, code)
        meta["state"] = "complete"
    write_json_atomic(out / SWEEP_META, meta)
    return SweepResult(streamer.written, meta["simulated"], meta["reused"], streamer.failed, meta["wall_s"],
                       backend.kind, backend.workers, out, streamer.errors)


def _publish(writer: TableWriter, out: Path, cache: OutcomeCache, meta: dict[str, Any], streamer: _Streamer,
             started: float, state: str) -> None:
    """Replace the table with the rows written so far, and record how the sweep went."""
    writer.publish(out / RESULTS, out / RESULTS_CSV)
    simulated, reused = cache.counts()
    meta.update(state=state, simulated=simulated, reused=reused, unique_configurations=simulated + reused,
                rows=streamer.written, failed=streamer.failed, wall_s=time.perf_counter() - started)
    write_json_atomic(out / SWEEP_META, meta)
