"""How disturbed the machine was during a measurement: load average and CPU steal time, sampled over a run.

A sampler thread reads ``/proc/stat`` (the aggregate ``cpu`` line: user nice system idle iowait irq softirq
steal ...) and ``/proc/loadavg`` every ``interval_s`` with the wall-clock time. Over any window of the run
(a validation configuration's generation, the whole probe) it reports the share of CPU time the hypervisor
stole (``steal_fraction``: Δsteal / Δall ticks), how busy the CPUs were (``busy_fraction``, steal excluded),
and the 1-minute load average (mean and max of the samples in the window), beside the CPU count. Where
``/proc`` is missing (not Linux) every figure is None.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


@dataclass(frozen=True)
class Sample:
    """One reading: wall time, cumulative CPU ticks by kind (``STAT_FIELDS``), 1-minute load average."""

    t: float
    ticks: tuple[int, ...]
    load1: float


def parse_stat(text: str) -> tuple[int, ...]:
    """Cumulative ticks of the aggregate ``cpu`` line of ``/proc/stat``, by ``STAT_FIELDS`` (missing: 0)."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:1 + len(STAT_FIELDS)]]
            return tuple(values + [0] * (len(STAT_FIELDS) - len(values)))
    raise ValueError("/proc/stat has no aggregate 'cpu' line")


def parse_loadavg(text: str) -> float:
    """The 1-minute load average of ``/proc/loadavg``."""
    return float(text.split()[0])


def read_sample(proc: Path = Path("/proc")) -> Sample | None:
    """A reading now, or None where ``/proc`` cannot be read."""
    try:
        ticks = parse_stat((proc / "stat").read_text())
        load1 = parse_loadavg((proc / "loadavg").read_text())
    except (OSError, ValueError):
        return None
    return Sample(time.time(), ticks, load1)


def window_figures(samples: list[Sample], t0: float | None = None, t1: float | None = None) -> dict[str, Any]:
    """Steal, busy and load figures over ``[t0, t1]`` (default: all samples), from the last sample at or before
    ``t0`` to the first at or after ``t1`` (so a window shorter than the interval still spans two readings)."""
    empty = {"steal_fraction": None, "busy_fraction": None, "load1_mean": None, "load1_max": None,
             "cpus": os.cpu_count(), "samples": 0}
    if len(samples) < 2:
        return empty
    t0 = samples[0].t if t0 is None else t0
    t1 = samples[-1].t if t1 is None else t1
    first = max((i for i, s in enumerate(samples) if s.t <= t0), default=0)
    last = min((i for i, s in enumerate(samples) if s.t >= t1), default=len(samples) - 1)
    if last <= first:
        last = min(first + 1, len(samples) - 1)
        first = last - 1
    a, b = samples[first], samples[last]
    delta = [y - x for x, y in zip(a.ticks, b.ticks, strict=True)]
    total = sum(delta)
    steal = delta[STAT_FIELDS.index("steal")]
    idle = delta[STAT_FIELDS.index("idle")] + delta[STAT_FIELDS.index("iowait")]
    loads = [s.load1 for s in samples[first:last + 1]]
    return {"steal_fraction": steal / total if total else None,
            "busy_fraction": (total - idle - steal) / total if total else None,
            "load1_mean": sum(loads) / len(loads), "load1_max": max(loads), "cpus": os.cpu_count(),
            "samples": last - first + 1}


@dataclass
class LoadSampler:
    """Samples the machine's load in a background thread between ``start()`` and ``stop()`` (or as a context
    manager); ``figures(t0, t1)`` summarises any window of that span."""

    interval_s: float = 0.5
    proc: Path = Path("/proc")
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _take(self) -> None:
        sample = read_sample(self.proc)
        if sample is not None:
            self.samples.append(sample)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def start(self) -> LoadSampler:
        self._take()
        self._thread = threading.Thread(target=self._loop, name="pipesim-load-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._take()

    def __enter__(self) -> LoadSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def figures(self, t0: float | None = None, t1: float | None = None) -> dict[str, Any]:
        return window_figures(self.samples, t0, t1)


def describe(figures: dict[str, Any]) -> str:
    """One line: 'steal 1.2%, busy 97%, load 3.1 (max 4.0) on 2 CPUs' (or 'load not observed')."""
    if figures.get("steal_fraction") is None:
        return "load not observed"
    return (f"steal {figures['steal_fraction']:.1%}, busy {figures['busy_fraction']:.0%}, load "
            f"{figures['load1_mean']:.1f} (max {figures['load1_max']:.1f}) on {figures['cpus']} CPUs")


def busy_warning(figures: dict[str, Any] | None) -> str | None:
    """A warning when the machine was busier than its CPUs during a probe (mean 1-minute load above the CPU
    count): other jobs then compete with the probe's ranks, which inflates the measured concurrent slowdown
    (on this project's 2-core VM: 1.0-1.1x quiet, 1.5-3.3x at a load of 3-8). None when quiet or not observed."""
    if not figures or figures.get("load1_mean") is None or not figures.get("cpus"):
        return None
    load, cpus = figures["load1_mean"], figures["cpus"]
    if load <= cpus:
        return None
    return (f"the machine was busy during the probe (load {load:.1f} on {cpus} CPUs): its concurrent slowdown "
            f"and stage times are likely overstated; calibrate again when the machine is quiet")
