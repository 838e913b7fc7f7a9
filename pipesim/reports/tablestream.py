"""Write a sweep's results table without holding it: rows arrive in study order a window at a time, each window
becomes one Parquet part file, and ``publish`` streams the parts (one row group each) into ``results.parquet``
and ``results.csv``, so memory does not grow with the number of points.

Parts may differ in columns (a window of failed points has no metrics; node counts change the ``util.nK``
columns) and in inferred types (a column of None); the published table has the union of the columns, in the
order a single in-memory table of every row would have, with types promoted to fit every part.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .folder import PARTS_PREFIX, write_atomic

ROW_GROUP_ROWS = 4096  # rows per row group of the published table (a few MB in memory while it is written)


def ordered_columns(columns: Iterable[str]) -> list[str]:
    """Columns in first-seen order, with the per-node ``util.nK`` columns sorted by K before ``util_mean``."""
    columns = list(dict.fromkeys(columns))
    util = sorted((c for c in columns if c.startswith("util.n")), key=lambda c: int(c[6:]))
    others = [c for c in columns if not c.startswith("util.n")]
    at = others.index("util_mean") if "util_mean" in others else len(others)
    return others[:at] + util + others[at:]


class TableWriter:
    """Parts of a table under ``out/.parts-<token>/`` until ``publish`` merges them into the final files."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.parts_dir = self.out / f"{PARTS_PREFIX}{uuid.uuid4().hex[:12]}"
        self.parts: list[Path] = []
        self.rows = 0

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Write ``rows`` (the next rows in table order) as one part."""
        if not rows:
            return
        self.parts_dir.mkdir(exist_ok=True)
        table = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False).replace_schema_metadata(None)
        path = self.parts_dir / f"{len(self.parts):06d}.parquet"
        pq.write_table(table, path)
        self.parts.append(path)
        self.rows += len(rows)

    def schema(self) -> pa.Schema:
        """The schema of the published table: every part's columns, types promoted to fit them all."""
        unified: pa.Schema | None = None
        names: dict[str, None] = {}
        for path in self.parts:  # one schema at a time: holding every part's grows with the table
            schema = pq.read_schema(path)
            names.update(dict.fromkeys(schema.names))
            unified = schema if unified is None else pa.unify_schemas([unified, schema],
                                                                        promote_options="permissive")
        assert unified is not None
        return pa.schema([unified.field(name) for name in ordered_columns(names)])

    def publish(self, parquet: Path, csv: Path) -> bool:
        """Merge the parts into ``parquet`` and ``csv`` (each replaced atomically); False if there are none."""
        if not self.parts:
            return False
        schema = self.schema()
        write_atomic(parquet, lambda path: self._write_parquet(path, schema))
        write_atomic(csv, lambda path: self._write_csv(path, schema))
        return True

    def discard(self) -> None:
        """Delete the parts (after publishing, or to give up)."""
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.parts = []

    def _conformed(self, schema: pa.Schema) -> Iterable[pa.Table]:
        for path in self.parts:
            table = pq.read_table(path)
            columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
                       else pa.nulls(len(table), f.type) for f in schema]
            yield pa.Table.from_arrays(columns, schema=schema)

    def _write_parquet(self, path: Path, schema: pa.Schema) -> None:
        """Parts gathered into row groups of about ``ROW_GROUP_ROWS`` rows: the writer keeps the metadata of
        every column chunk until it closes, which for one small row group per part grows with the table."""
        with pq.ParquetWriter(path, schema) as writer:
            group: list[pa.Table] = []
            rows = 0
            for table in self._conformed(schema):
                group.append(table)
                rows += len(table)
                if rows >= ROW_GROUP_ROWS:
                    writer.write_table(pa.concat_tables(group))
                    group, rows = [], 0
            if group:
                writer.write_table(pa.concat_tables(group))

    def _write_csv(self, path: Path, schema: pa.Schema) -> None:
        with open(path, "w", newline="") as handle:
            for i, table in enumerate(self._conformed(schema)):
                table.to_pandas().to_csv(handle, index=False, header=i == 0)
