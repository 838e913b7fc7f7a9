"""Metrics from a trace, one function for both engines: simulated and measured numbers are comparable.

One pass over the records (``MetricsTally``); a simulation that keeps no records feeds the tally as it goes."""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from .trace import RecordKind, Trace

T = TypeVar("T")


def median_by_throughput(items: Sequence[T], metrics_of: Callable[[T], dict[str, Any]]) -> T:
    """The item whose ``tokens_per_s`` is the median (the lower middle one of an even count; none counts as 0):
    of repeated generations, the one a shared machine's drift moved least."""
    ranked = sorted(items, key=lambda item: metrics_of(item).get("tokens_per_s") or 0.0)
    return ranked[(len(ranked) - 1) // 2]


_TOKENS, _COMPUTE, _TRANSFER, _LAUNCH, _SKIP, _INVALIDATE, _CANCEL_SENT = range(7)
_KINDS: dict[Any, int] = {}
for _kind, _index in ((RecordKind.TOKENS, _TOKENS), (RecordKind.COMPUTE, _COMPUTE), (RecordKind.TRANSFER, _TRANSFER),
                      (RecordKind.LAUNCH, _LAUNCH), (RecordKind.SKIP, _SKIP), (RecordKind.INVALIDATE, _INVALIDATE),
                      (RecordKind.CANCEL_SENT, _CANCEL_SENT)):
    _KINDS[_kind] = _KINDS[_kind.value] = _index  # enum members hash by name: both spellings are keys
del _kind, _index


class _Busy:
    """The union of one resource's busy spans, swept in sorted order (nested spans count once): spans are
    folded once no span still to come can sort before them; the rest wait in ``pending``."""

    __slots__ = ("busy", "reach", "pending", "last")

    def __init__(self, t0: float) -> None:
        self.busy = 0.0
        self.reach = t0
        self.pending: list[tuple[float, float]] = []
        self.last: tuple[float, float] | None = None  # the last span folded

    def fold(self, watermark: float, now: float) -> None:
        """Fold the pending spans that start before ``watermark`` (no later span will) and end by ``now``
        (so the trace's end cannot clip them), in sorted order."""
        pending = self.pending
        pending.sort()
        busy, reach, n = self.busy, self.reach, 0
        for a, b in pending:
            if a >= watermark or b > now:
                break
            if a < reach:
                a = reach
            if b > a:
                busy += b - a
                reach = b
            n += 1
        if n:
            if self.last is not None and pending[0] < self.last:
                raise RuntimeError(f"metrics: a busy span {pending[0]} came after {self.last} had been counted")
            self.last = pending[n - 1]
            del pending[:n]
            self.busy, self.reach = busy, reach

    def fraction(self, t0: float, t1: float) -> float:
        """Busy fraction of [t0, t1], every span counted (clipped at ``t1``)."""
        wall = t1 - t0
        if wall <= 0:
            return 0.0
        pending = self.pending
        pending.sort()
        if self.last is not None and pending and pending[0] < self.last:
            raise RuntimeError(f"metrics: a busy span {pending[0]} came after {self.last} had been counted")
        busy, reach = self.busy, self.reach
        for a, b in pending:
            a, b = max(a, reach), min(b, t1)
            if b > a:
                busy += b - a
                reach = b
        return busy / wall


class _PerRun:
    """A float and a flag per run id, compact (8 bytes and 1 byte per run: run ids are small consecutive
    integers), with a dict for ids outside that range."""

    __slots__ = ("values", "flags", "n_flagged", "other_values", "other_flags")
    LIMIT = 1 << 24

    def __init__(self) -> None:
        self.values = array("d")
        self.flags = bytearray()
        self.n_flagged = 0
        self.other_values: dict[int, float] = {}
        self.other_flags: set[int] = set()

    def _grow(self, run_id: int) -> None:
        extra = max(run_id + 1 - len(self.flags), len(self.flags), 64)
        self.values.frombytes(bytes(8 * extra))
        self.flags.extend(bytes(extra))

    def add(self, run_id: int, value: float) -> None:
        if 0 <= run_id < self.LIMIT:
            if run_id >= len(self.flags):
                self._grow(run_id)
            self.values[run_id] += value
        else:
            self.other_values[run_id] = self.other_values.get(run_id, 0.0) + value

    def flag(self, run_id: int) -> None:
        if 0 <= run_id < self.LIMIT:
            if run_id >= len(self.flags):
                self._grow(run_id)
            if not self.flags[run_id]:
                self.flags[run_id] = 1
                self.n_flagged += 1
        elif run_id not in self.other_flags:
            self.other_flags.add(run_id)
            self.n_flagged += 1

    def flagged(self) -> list[int]:
        return [i for i, f in enumerate(self.flags) if f] + sorted(self.other_flags)

    def value(self, run_id: int) -> float:
        if 0 <= run_id < len(self.values):
            return self.values[run_id]
        return self.other_values.get(run_id, 0.0)


class MetricsTally:
    """What ``compute_metrics`` needs of a trace, accumulated as records arrive (one pass over them).

    ``add(records)`` takes records (``Record``s or plain tuples in its field order) in the order an engine wrote
    them; a simulation that keeps no records feeds it batches and passes ``watermark`` (no record still to come
    starts before it) and ``now``, so busy spans are folded as it goes and memory does not grow with the records:
    only a few numbers per generated token and per run remain (commit times, per-run compute time, flags).

    The wasted share: with ``in_order`` (a trace's records) the invalidated runs' stage computes are summed in
    record order, as ever; without (no records kept) each run's compute is summed and the runs' sums are added
    exactly (``math.fsum``), which can differ in the last digit.
    """

    def __init__(self, t_start: float = 0.0, in_order: bool = True) -> None:
        self.t_start = t_start
        self.commit_times: list[float] = []
        self.commit_counts: list[int] = []
        self.checked = self.accepted = 0
        self.nodes: dict[str, _Busy] = {}
        self.links: dict[str, _Busy] = {}
        self.target_compute = 0.0
        # per run: its stages' compute time (summed in record order) and whether it was invalidated; or, with
        # ``in_order``, every stage compute (run, time) in record order
        self.invalid = _PerRun()
        self.cancelled = _PerRun()
        self.stage_computes: list[tuple[int, float]] | None = [] if in_order else None
        self.launched = self.speculative = self.skipped = self.aborted = 0

    def add(self, records, watermark: float | None = None, now: float | None = None) -> None:
        """Count ``records``; with ``watermark`` and ``now``, fold the busy spans that can be folded."""
        kinds = _KINDS
        nodes, links, invalid = self.nodes, self.links, self.invalid
        t_start = self.t_start
        for r in records:
            kind = kinds.get(r[0])
            if kind is None:
                continue
            if kind == _COMPUTE:
                busy = nodes.get(r[3])
                if busy is None:
                    busy = nodes[r[3]] = _Busy(t_start)
                busy.pending.append((r[1], r[2]))
                if r[9] == "stage":
                    duration = r[2] - r[1]
                    self.target_compute += duration
                    if self.stage_computes is not None:
                        self.stage_computes.append((r[4], duration))
                    else:
                        invalid.add(r[4], duration)
                if r[13]:
                    self.aborted += 1
            elif kind == _TRANSFER:
                busy = links.get(r[3])
                if busy is None:
                    busy = links[r[3]] = _Busy(t_start)
                busy.pending.append((r[1], r[2]))
            elif kind == _TOKENS:
                self.checked += r[7]
                self.accepted += r[8]
                if r[5]:
                    self.commit_times.append(r[1])
                    self.commit_counts.append(r[5])
            elif kind == _LAUNCH:
                self.launched += 1
                if r[12]:
                    self.speculative += 1
            elif kind == _SKIP:
                self.skipped += 1
            elif kind == _INVALIDATE:
                invalid.flag(r[4])
            else:
                self.cancelled.flag(r[4])
        if watermark is not None and now is not None:
            for busy in (*nodes.values(), *links.values()):
                if busy.pending:
                    busy.fold(watermark, now)

    def token_times(self) -> tuple[list[float], list[float]]:
        """As ``token_times`` of a trace (see there)."""
        times: list[float] = []
        itls: list[float] = []
        previous: float | None = None
        for t, n in zip(self.commit_times, self.commit_counts, strict=True):
            times.extend([t] * n)
            if previous is not None:
                itls.extend([(t - previous) / n] * n)
            previous = t
        return times, itls

    def metrics(self, trace: Trace) -> dict[str, Any]:
        """The metrics (``compute_metrics``) of ``trace``, whose records are the ones counted here."""
        t0, t1 = trace.t_start, trace.t_end
        times, itls = self.token_times()
        n = len(times)
        counts = self.commit_counts
        invalid = self.invalid
        if self.stage_computes is not None:
            wasted_compute = 0.0
            flags = invalid.flags
            for run_id, duration in self.stage_computes:
                if (flags[run_id] if 0 <= run_id < len(flags) else run_id in invalid.other_flags):
                    wasted_compute += duration
        else:
            wasted_compute = math.fsum(invalid.value(run_id) for run_id in invalid.flagged())

        def stat(values: list[float], q: float | None = None) -> float | None:
            if not values:
                return None
            return float(np.mean(values)) if q is None else float(np.percentile(values, q))

        decode_time = times[-1] - times[0] if n > 1 else 0.0
        checked, accepted = self.checked, self.accepted
        empty = _Busy(t0)
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
            "mean_tokens_per_commit": (n - counts[0]) / (len(counts) - 1) if len(counts) > 1 else None,
            "node_utilization": {name: self.nodes.get(name, empty).fraction(t0, t1) for name in trace.nodes},
            "link_utilization": {name: busy.fraction(t0, t1) for name, busy in sorted(self.links.items())},
            "wasted_compute_fraction": wasted_compute / self.target_compute if self.target_compute > 0 else 0.0,
            "runs_launched": self.launched,
            "runs_speculative": self.speculative,
            "runs_invalidated": invalid.n_flagged,
            "runs_cancelled": self.cancelled.n_flagged,
            "stage_work_skipped": self.skipped,
            "stage_work_aborted": self.aborted,
            "wall_s": t1 - t0,
            # as the reference codes compute them: PipeInfer (examples/speculative/speculative.cpp) times from the end
            # of the prompt's processing (the first token) to the second token, and decodes n_predict tokens over the
            # time since the first; PipeSpec (decoding.py) divides the whole request's time, prefill included
            "reference_ttft_s": times[1] - times[0] if n > 1 else None,
            "reference_decode_tokens_per_s": n / decode_time if decode_time > 0 else None,
            "ms_per_token": 1e3 * (times[-1] - t0) / n if n else None,
        }


def tally_of(trace: Trace) -> MetricsTally:
    """The trace's tally: the one a simulation without records kept (``trace.summary``), else its records'."""
    if trace.summary is not None:
        return trace.summary
    tally = MetricsTally(trace.t_start)
    tally.add(trace.records)
    return tally


def token_times(trace: Trace) -> tuple[list[float], list[float]]:
    """Commit time of every generated token, and each token's inter-token latency.

    Tokens committed together share the gap since the previous commit (the gap divided by their number),
    so the mean inter-token latency equals the inverse of the decode rate. The first commit has no ITL.
    """
    return tally_of(trace).token_times()


def compute_metrics(trace: Trace) -> dict[str, Any]:
    """Tokens/s, TTFT, ITL mean/p50/p99, utilization per node and link, acceptance, wasted compute (one pass over
    the records; the wasted share sums each invalidated run's compute exactly, ``math.fsum``)."""
    return tally_of(trace).metrics(trace)


def clean_for_json(value: Any) -> Any:
    """Replace NaN/inf with None so the metrics serialise as strict JSON."""
    if isinstance(value, dict):
        return {k: clean_for_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_for_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
