"""One point of a sweep: its configuration key, and its simulation flattened into one table row."""

from __future__ import annotations

import gc
import hashlib
import json
import math
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import compute_metrics, token_times
from ..scenario import Scenario, scenario_from_dict
from ..sim import simulate as simulate_scenario
from ..trace import Trace
from .analytic import analytic_columns

# Metrics that are not scalars per point, or repeat the row's own fields.
_SKIPPED_METRICS = {"node_utilization", "link_utilization", "strategy", "scenario"}
ITL_QUANTILES = (10, 25, 75, 90)


def pipesim_version() -> str:
    try:
        return version("pipesim")
    except PackageNotFoundError:
        return "unknown"


def simulation_document(scenario: Scenario) -> dict[str, Any]:
    """What determines the simulated result: the scenario without names, executor settings, or the knobs of
    strategies other than the one that runs (so, e.g., iterative at every α is simulated once)."""
    document = scenario.model_dump(mode="json", exclude={"name", "description", "executor"})
    strategy = scenario.strategy
    document["strategy"] = {"name": strategy.name, **strategy.params()}
    if strategy.name == "iterative":
        document.pop("acceptance")
        document["models"].pop("draft")
        document["models"].pop("draft_quantization")
    return document


# What decides a simulated outcome, besides the scenario: these sources (relative to the package).
_ENGINE_SOURCES = ("sim", "scheduling", "world", "metrics.py", "trace.py", "scenario.py", "placement.py", "units.py",
                   "hardware.py", "models/catalog.py", "models/catalog_entries.py", "models/spec.py",
                   "models/shapes.py", "reports/outcome.py", "reports/analytic.py")


def code_fingerprint() -> str:
    """A hash of the simulator's source files: a changed simulator never reuses results of the old one."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(pipesim_version().encode())
    for name in _ENGINE_SOURCES:
        path = package / name
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            if source.is_file():
                digest.update(str(source.relative_to(package)).encode())
                digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def config_key(scenario: Scenario, code: str = "") -> str:
    """A short hash of the resolved configuration and of the code that simulates it (``code_fingerprint()``)."""
    payload = json.dumps({"scenario": simulation_document(scenario), "engine": "simulated", "code": code},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def resolved_fields(scenario: Scenario) -> dict[str, Any]:
    """The scenario fields every row carries, resolved to numbers (bandwidth in bit/s)."""
    split = scenario.placement.layer_split
    overrides = [o.model_dump(exclude_none=True) for o in scenario.cluster.overrides]
    return {
        "strategy": scenario.strategy.name,
        "bandwidth_bps": scenario.network.bandwidth * 8.0,
        "latency_s": scenario.network.latency,
        "nodes": scenario.cluster.count,
        "layer_split": json.dumps(split) if split is not None else "even",
        "node_overrides": json.dumps(overrides) if overrides else "",
        "alpha": scenario.acceptance_alpha(),
        "gamma": scenario.strategy.gamma,
        "micro_batch": scenario.strategy.micro_batch,
        "prompt_tokens": scenario.workload.prompt_tokens,
        "generate_tokens": scenario.workload.generate_tokens,
        "target": scenario.models.target_spec().name,
        "draft": scenario.models.draft_spec().name if scenario.models.draft is not None else "",
        "acceptance_seed": scenario.acceptance.seed,
        "workload_seed": scenario.workload.seed,
    }


def metric_columns(trace: Trace) -> dict[str, Any]:
    """Every scalar metric, extra inter-token-latency quantiles, and utilizations flattened and summarized."""
    metrics = compute_metrics(trace)
    row = {k: v for k, v in metrics.items() if k not in _SKIPPED_METRICS}
    _, itls = token_times(trace)
    for q in ITL_QUANTILES:
        row[f"itl_p{q}_s"] = float(np.percentile(itls, q)) if itls else None
    nodes = metrics["node_utilization"]
    links = metrics["link_utilization"]
    for name, value in nodes.items():
        row[f"util.{name}"] = value
    node_values = list(nodes.values())
    row["util_mean"] = float(np.mean(node_values)) if node_values else None
    row["util_min"] = min(node_values) if node_values else None
    row["util_max"] = max(node_values) if node_values else None
    row["link_util_mean"] = float(np.mean(list(links.values()))) if links else 0.0
    row["link_util_max"] = max(links.values()) if links else 0.0
    row["busiest_link"] = max(links, key=links.get) if links else ""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def simulate(scenario: Scenario) -> Trace:
    """A point's simulation: metrics only (no records kept: a point's memory does not grow with its records)."""
    return simulate_scenario(scenario, records=False)


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while a simulation allocates its many small, short-lived objects (events,
    records): the collector's passes cost 15-20% of a point. Restored afterwards; cycles are freed then."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def evaluate(document: dict[str, Any]) -> dict[str, Any]:
    """Simulate one resolved scenario document; returns its outcome columns (never raises)."""
    started = time.perf_counter()
    try:
        scenario = scenario_from_dict(document)
        with paused_gc():
            trace = simulate(scenario)
        outcome = metric_columns(trace)
        outcome.update(analytic_columns(scenario, outcome.get("acceptance_rate")))
        outcome["error"] = ""
    except Exception as error:  # a failed point is recorded, not fatal: the rest of the sweep goes on
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        outcome = {"error": last}
    outcome["sim_runtime_s"] = time.perf_counter() - started
    return outcome


def evaluate_batch(batch: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Evaluate several ``(config_key, document)`` pairs (one task of a worker pool)."""
    return [(key, evaluate(document)) for key, document in batch]
