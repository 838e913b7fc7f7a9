"""Metrics from a trace, one function for both engines: simulated and measured numbers are comparable."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from .trace import Trace

T = TypeVar("T")


def median_by_throughput(items: Sequence[T], metrics_of: Callable[[T], dict[str, Any]]) -> T:
    """The item whose ``tokens_per_s`` is the median (the lower middle one of an even count; none counts as 0):
    of repeated generations, the one a shared machine's drift moved least."""
    ranked = sorted(items, key=lambda item: metrics_of(item).get("tokens_per_s") or 0.0)
    return ranked[(len(ranked) - 1) // 2]


def _busy_fraction(spans: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Fraction of [t0, t1] covered by the union of ``spans`` (nested spans, e.g. SPEED's early exit inside its
    stage's compute, count once)."""
    wall = t1 - t0
    if wall <= 0:
        return 0.0
    busy = 0.0
    reach = t0
    for a, b in sorted(spans):
        a, b = max(a, reach), min(b, t1)
        if b > a:
            busy += b - a
            reach = b
    return busy / wall


def token_times(trace: Trace) -> tuple[list[float], list[float]]:
    """Commit time of every generated token, and each token's inter-token latency.

    Tokens committed together share the gap since the previous commit (the gap divided by their number),
    so the mean inter-token latency equals the inverse of the decode rate. The first commit has no ITL.
    """
    times: list[float] = []
    itls: list[float] = []
    previous: float | None = None
    for r in trace.records:
        if r.kind != "tokens" or r.n_tokens == 0:
            continue
        times.extend([r.t0] * r.n_tokens)
        if previous is not None:
            itls.extend([(r.t0 - previous) / r.n_tokens] * r.n_tokens)
        previous = r.t0
    return times, itls


def compute_metrics(trace: Trace) -> dict[str, Any]:
    """Tokens/s, TTFT, ITL mean/p50/p99, utilization per node and link, acceptance, wasted compute."""
    t0, t1 = trace.t_start, trace.t_end
    times, itls = token_times(trace)
    n = len(times)
    checked = sum(r.checked for r in trace.records if r.kind == "tokens")
    accepted = sum(r.accepted for r in trace.records if r.kind == "tokens")
    commits = [r for r in trace.records if r.kind == "tokens" and r.n_tokens]

    node_spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    link_spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    invalid: set[int] = {r.run_id for r in trace.records if r.kind == "invalidate"}
    target_compute = wasted_compute = 0.0
    for r in trace.records:
        if r.kind == "compute":
            node_spans[r.where].append((r.t0, r.t1))
            if r.what == "stage":
                target_compute += r.t1 - r.t0
                if r.run_id in invalid:
                    wasted_compute += r.t1 - r.t0
        elif r.kind == "transfer":
            link_spans[r.where].append((r.t0, r.t1))

    def stat(values: list[float], q: float | None = None) -> float | None:
        if not values:
            return None
        return float(np.mean(values)) if q is None else float(np.percentile(values, q))

    decode_time = times[-1] - times[0] if n > 1 else 0.0
    launched = [r for r in trace.records if r.kind == "launch"]
    return {
        "engine": trace.engine,
        "strategy": trace.strategy,
        "scenario": trace.scenario,
        "generated_tokens": n,
        "tokens_per_s": (n - 1) / decode_time if decode_time > 0 else None,
        "e2e_tokens_per_s": n / (times[-1] - t0) if n and times[-1] > t0 else None,
        "ttft_s": times[0] - t0 if n else None,
        "itl_mean_s": stat(itls),
        "itl_p50_s": stat(itls, 50),
        "itl_p99_s": stat(itls, 99),
        "acceptance_rate": accepted / checked if checked else None,
        "drafted_checked": checked,
        "drafted_accepted": accepted,
        "mean_tokens_per_commit": (n - commits[0].n_tokens) / (len(commits) - 1) if len(commits) > 1 else None,
        "node_utilization": {name: _busy_fraction(node_spans.get(name, []), t0, t1) for name in trace.nodes},
        "link_utilization": {name: _busy_fraction(spans, t0, t1) for name, spans in sorted(link_spans.items())},
        "wasted_compute_fraction": wasted_compute / target_compute if target_compute > 0 else 0.0,
        "runs_launched": len(launched),
        "runs_speculative": sum(1 for r in launched if r.speculative),
        "runs_invalidated": len(invalid),
        "runs_cancelled": len({r.run_id for r in trace.records if r.kind == "cancel_sent"}),
        "stage_work_skipped": sum(1 for r in trace.records if r.kind == "skip"),
        "stage_work_aborted": sum(1 for r in trace.records if r.kind == "compute" and r.aborted),
        "wall_s": t1 - t0,
        # as the reference codes compute them: PipeInfer (examples/speculative/speculative.cpp) times from the end
        # of the prompt's processing (the first token) to the second token, and decodes n_predict tokens over the
        # time since the first; PipeSpec (decoding.py) divides the whole request's time, prefill included
        "reference_ttft_s": times[1] - times[0] if n > 1 else None,
        "reference_decode_tokens_per_s": n / decode_time if decode_time > 0 else None,
        "ms_per_token": 1e3 * (times[-1] - t0) / n if n else None,
    }


def clean_for_json(value: Any) -> Any:
    """Replace NaN/inf with None so the metrics serialise as strict JSON."""
    if isinstance(value, dict):
        return {k: clean_for_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_for_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
