"""When a waiting rank notices a message: the executor's polling with backoff, as the simulator charges it.

A rank with nothing to do does not block in MPI (that would spin a core); it probes, sleeps, and probes again,
sleeping 50 us at first and twice as long each time up to ``executor.poll_interval_s``, and every sleep ends a
little late (the OS timer slack, ``overshoot``). A message arriving while it sleeps waits for the next probe. The
longer a rank has been idle, the longer that wait: next to nothing in a busy PipeInfer pipeline, up to
``longest + overshoot`` for a rank that idles through every other stage's work (iterative decoding).

With the executor's link emulation, MPI delivers a message at once but the executor holds it until its emulated
arrival: the rank finds it at its first probe after MPI delivered it, then sleeps just until that arrival (and
wakes ``overshoot`` late), so the emulated link time and the polling overlap instead of adding up.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PollBackoff"]


@dataclass(frozen=True)
class PollBackoff:
    """Probe times of a rank idle since ``t0``: t0, then after sleeps of first, 2·first, ... up to longest, each
    ``overshoot`` late."""

    first: float
    longest: float
    overshoot: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.longest or self.overshoot < 0:
            raise ValueError(f"poll backoff needs 0 < first <= longest and overshoot >= 0, got {self}")

    def noticed(self, idle_since: float, arrival: float) -> float:
        """The first probe at or after ``arrival`` of a rank idle since ``idle_since``."""
        t = idle_since
        if arrival <= t:
            return t
        sleep = self.first
        while sleep < self.longest:  # the doubling phase: a handful of steps
            t += sleep + self.overshoot
            if t >= arrival:
                return t
            sleep = min(2 * sleep, self.longest)
        step = self.longest + self.overshoot
        k = max(0, -int(-(arrival - t) // step))  # ceil((arrival - t) / step)
        return t + k * step

    def noticed_held(self, idle_since: float, delivered: float, due: float) -> float:
        """When a rank idle since ``idle_since`` takes a message that MPI ``delivered`` but the executor's link
        emulation holds until ``due``: found at the first probe after delivery, then a sleep until ``due`` (at
        least ``first``) if that probe came earlier."""
        found = self.noticed(idle_since, delivered)
        if found >= due:
            return found
        return max(due, found + self.first) + self.overshoot
