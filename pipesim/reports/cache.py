"""The outcome cache of a sweep folder: one row per simulated configuration, keyed by its config key.

A SQLite file (``cache.sqlite``) written by the sweep process only, one transaction per finished batch of
points, so a killed sweep loses at most the points in flight and a re-run simulates only what is missing. Each
row remembers the sweep that simulated it (``run``) and the last sweep that used it (``used``): a sweep counts
what it simulated and reused without holding a set of every key, and ``--force`` re-simulates each
configuration once per sweep. Failed points are kept (so the table can show them) but never reused.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CACHE_FILE = "cache.sqlite"
_CHUNK = 500  # keys per query (SQLite's limit on bound parameters is 999 in old builds)


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers (for JSON)."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _chunks(keys: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(keys), _CHUNK):
        yield keys[start:start + _CHUNK]


class OutcomeCache:
    """Outcomes by config key, in ``folder/cache.sqlite``; ``run`` names the sweep using it (a unique token)."""

    def __init__(self, folder: Path, run: str) -> None:
        self.path = Path(folder) / CACHE_FILE
        self.run = run
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # survives a killed process; fsync only at checkpoints
        self._db.execute("CREATE TABLE IF NOT EXISTS outcomes (config_key TEXT PRIMARY KEY, failed INTEGER NOT NULL,"
                         " outcome TEXT NOT NULL, run TEXT NOT NULL, used TEXT NOT NULL DEFAULT '')")

    def close(self) -> None:
        self._db.close()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0])

    def put(self, results: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Store finished outcomes (one transaction: all of them or, if the process dies, none)."""
        rows = [(key, int(bool(outcome.get("error"))), json.dumps(outcome, default=_plain), self.run)
                for key, outcome in results]
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO outcomes (config_key, failed, outcome, run) "
                                 "VALUES (?, ?, ?, ?)", rows)

    def known(self, keys: list[str], force: bool = False) -> set[str]:
        """The keys whose outcome this sweep may use: simulated successfully before (unless ``force``), or
        simulated by this sweep (failed or not)."""
        found: set[str] = set()
        for chunk in _chunks(keys):
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT config_key, failed, run FROM outcomes WHERE config_key IN ({marks})",
                                    chunk)
            found.update(key for key, failed, run in rows if run == self.run or not (failed or force))
        return found

    def outcomes(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """The stored outcomes of ``keys`` (those present)."""
        found: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(keys):
            marks = ",".join("?" * len(chunk))
            for key, text in self._db.execute(f"SELECT config_key, outcome FROM outcomes "
                                              f"WHERE config_key IN ({marks})", chunk):
                found[key] = json.loads(text)
        return found

    def mark_used(self, keys: list[str]) -> None:
        """Record that this sweep's table uses ``keys``."""
        with self._db:
            self._db.execute("BEGIN")
            for chunk in _chunks(keys):
                marks = ",".join("?" * len(chunk))
                self._db.execute(f"UPDATE outcomes SET used = ? WHERE config_key IN ({marks})", [self.run, *chunk])

    def counts(self) -> tuple[int, int]:
        """(simulated by this sweep, reused from before) among the configurations this sweep used."""
        simulated, reused = self._db.execute(
            "SELECT COALESCE(SUM(run = ?), 0), COALESCE(SUM(run != ?), 0) FROM outcomes WHERE used = ?",
            (self.run, self.run, self.run)).fetchone()
        return int(simulated), int(reused)

    def import_outcomes(self, outcomes: dict[str, dict[str, Any]]) -> None:
        """Seed the cache from the table of a folder written before the cache existed."""
        rows = [(key, json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                                  for k, v in outcome.items()}, default=_plain), "imported")
                for key, outcome in outcomes.items()]
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO outcomes (config_key, failed, outcome, run) "
                                 "VALUES (?, 0, ?, ?)", rows)
