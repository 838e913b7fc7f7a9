"""What the head writes after each generation: metrics (table or JSON), Chrome trace, records, saved traces."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..describe import describe_scenario, print_metrics
from ..trace import write_chrome_trace
from .options import indexed_path


def print_result(metrics: dict[str, Any], variant: str, as_json: bool, file=sys.stdout, scenario=None) -> None:
    """One JSON object (``variant`` added when the job has several generations), or a readable table (headed by
    what ``scenario`` describes, when given)."""
    if as_json:
        payload = dict(metrics)
        if variant:
            payload["variant"] = variant
        print(json.dumps(payload), file=file, flush=True)
        return
    label = f" [{variant}]" if variant else ""
    print(f"measured: scenario {metrics['scenario']!r}, strategy {metrics['strategy']}{label} (MPI executor: every "
          f"time below is measured wall-clock time)", file=file)
    if scenario is not None:
        ex = scenario.executor
        print("\n".join(describe_scenario(scenario)), file=file)
        print(f"  executor:   model {ex.model}, {ex.compute} compute, draft {ex.draft}, link emulation "
              f"{'on' if ex.link_emulation else 'off'}", file=file)
        print(file=file)
    shown = {k: v for k, v in metrics.items() if k not in ("output_tokens", "output_text")}
    print_metrics(shown, file=file, simulated=False)
    if metrics.get("output_text") is not None:
        print(f"output_text  {metrics['output_text']!r}", file=file)
    else:
        print(f"output_tokens  {metrics['output_tokens']}", file=file)
    file.flush()


def write_files(result, index: int, total: int, trace_path: str | None, records_path: str | None) -> None:
    """Chrome trace and raw records of one generation (``name-<i>.ext`` when the job has several)."""
    if trace_path:
        write_chrome_trace(result.trace, indexed_path(trace_path, index, total))
    if records_path:
        path = indexed_path(records_path, index, total)
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = result.trace.to_frame()
        if path.suffix == ".parquet":
            frame.to_parquet(path, index=False)
        else:
            frame.to_csv(path, index=False)


def save_traces(path: str | Path, entries: list[dict[str, Any]]) -> None:
    """A JSON list with, per generation, its variant, metrics and the whole trace (records and metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))
