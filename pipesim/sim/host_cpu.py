"""Nodes that share a host: compute slows down while several of them compute at once.

When the executor's ranks share one machine (this project's 2-core development box, or several ranks per node on
a cluster), a stage computing while another rank on the same host computes runs slower: cores, caches and
memory bandwidth are shared. ``pipesim calibrate`` measures that as a per-node ``concurrent_slowdown``: the
ratio of a stage's compute time with every rank of its host computing to its time alone.

The model is processor sharing: a node's job progresses at rate 1 alone and ``1 / slowdown(k)`` while ``k``
jobs of its host run, with ``slowdown(k) = 1 + (s - 1)(k - 1)`` (``s`` measured at k = 2). Rates change
whenever a job of the host starts or ends, so partial overlaps are charged exactly. Nodes on a host of their
own (or with ``s = 1``) take the plain path: one timeout, no extra events.

Two ways to run work: as SimPy generators (``job(...).run()``, ``compute(...)``), or with callbacks
(``start(node, work, on_done)``, which the simulator uses: no process per stage); both schedule the same events.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence

import simpy
from simpy.events import NORMAL

__all__ = ["ComputeJob", "SharedHosts", "SoloRun"]

_EPS = 1e-12


class ComputeJob:
    """Work (seconds of compute alone) in progress on one node; ``done`` is the work finished so far."""

    def __init__(self, hosts: SharedHosts, node: int, work: float) -> None:
        self.hosts = hosts
        self.node = node
        self.work = work
        self.done = 0.0
        self._since = hosts.env.now
        self._rate = 1.0

    def run(self) -> Generator[simpy.Event, object, None]:
        """SimPy generator: returns once ``work`` is done. An interrupt leaves ``done`` up to date."""
        hosts, env = self.hosts, self.hosts.env
        group = hosts.group_of(self.node)
        if group is None:
            self._since = env.now
            try:
                yield env.timeout(self.work)
            finally:
                self.done = min(self.work, env.now - self._since)
            return
        self._since = env.now
        group.add(self)
        try:
            while self.work - self.done > _EPS:
                remaining = (self.work - self.done) / self._rate
                yield env.any_of([env.timeout(remaining), group.changed])
                self._advance()
        finally:
            self._advance()
            group.remove(self)

    def _advance(self) -> None:
        now = self.hosts.env.now
        self.done = min(self.work, self.done + (now - self._since) * self._rate)
        self._since = now


class SoloRun:
    """Work on a node of its own: the SimPy event of its end (one event; cheaper than a Timeout). ``on_done(run)``
    is called at the end unless ``interrupt()`` came first."""

    __slots__ = ("callbacks", "env", "since", "work")
    _ok = True  # what SimPy's loop reads of a processed event

    def interrupt(self) -> float:
        """Stop the work now; returns the work done (its end event still fires, doing nothing)."""
        self.callbacks.clear()
        return min(self.work, self.env.now - self.since)


class _CallbackJob(ComputeJob):
    """``ComputeJob.run`` without a process: the same events (any_of the job's end and the host's rate change),
    a callback ``on_done(job)`` at the end."""

    def __init__(self, hosts: SharedHosts, group: _HostGroup, node: int, work: float,
                 on_done: Callable[[ComputeJob], None]) -> None:
        super().__init__(hosts, node, work)
        self._group = group
        self._on_done = on_done
        self._target: simpy.Event | None = None
        group.add(self)
        self._wait()

    def _wait(self) -> None:
        if self.work - self.done > _EPS:
            env = self.hosts.env
            remaining = (self.work - self.done) / self._rate
            self._target = env.any_of([env.timeout(remaining), self._group.changed])
            self._target.callbacks.append(self._resume)
            return
        self._advance()
        self._group.remove(self)
        self._on_done(self)

    def _resume(self, _event: simpy.Event) -> None:
        self._advance()
        self._wait()

    def interrupt(self) -> float:
        """Stop the work now (the host's other jobs speed up); returns the work done."""
        self._target.callbacks.remove(self._resume)
        self._advance()
        self._group.remove(self)
        return self.done


class _HostGroup:
    """The running jobs of one host and the event that fires when their number changes."""

    def __init__(self, env: simpy.Environment, slowdown: dict[int, float]) -> None:
        self.env = env
        self.slowdown = slowdown
        self.jobs: list[ComputeJob] = []
        self.changed = env.event()

    def add(self, job: ComputeJob) -> None:
        self._settle()
        self.jobs.append(job)
        self._rerate()

    def remove(self, job: ComputeJob) -> None:
        if job in self.jobs:
            self._settle()
            self.jobs.remove(job)
            self._rerate()

    def _settle(self) -> None:
        for job in self.jobs:
            job._advance()

    def _rerate(self) -> None:
        k = len(self.jobs)
        for job in self.jobs:
            job._rate = 1.0 / (1.0 + (self.slowdown[job.node] - 1.0) * (k - 1))
        old, self.changed = self.changed, self.env.event()
        old.succeed()


class SharedHosts:
    """Which nodes share a host, and how much each slows while its host-mates compute."""

    def __init__(self, env: simpy.Environment, hosts: Sequence[str | None], slowdown: Sequence[float]) -> None:
        if len(hosts) != len(slowdown):
            raise ValueError(f"{len(hosts)} hosts but {len(slowdown)} slowdown factors")
        for i, s in enumerate(slowdown):
            if not s >= 1.0:
                raise ValueError(f"node {i}: concurrent_slowdown must be >= 1, got {s}")
        self.env = env
        members: dict[str, list[int]] = {}
        for node, host in enumerate(hosts):
            if host:
                members.setdefault(host, []).append(node)
        self._groups: dict[int, _HostGroup] = {}
        for nodes in members.values():
            if len(nodes) < 2 or all(slowdown[n] == 1.0 for n in nodes):
                continue
            group = _HostGroup(env, {n: slowdown[n] for n in nodes})
            for n in nodes:
                self._groups[n] = group

    @property
    def shared(self) -> bool:
        """True when some node's compute can be slowed by a host-mate."""
        return bool(self._groups)

    def group_of(self, node: int) -> _HostGroup | None:
        return self._groups.get(node)

    def job(self, node: int, work: float) -> ComputeJob:
        """A job of ``work`` seconds (alone) on ``node``; run it with ``yield from job.run()``."""
        return ComputeJob(self, node, work)

    def start(self, node: int, work: float, on_done: Callable) -> SoloRun | ComputeJob:
        """Start ``work`` seconds (alone) on ``node``; ``on_done(job)`` runs when it is done. The job's
        ``interrupt()`` stops it and returns the work done. The same events as ``compute``, without a process."""
        group = self._groups.get(node)
        if group is not None:
            return _CallbackJob(self, group, node, work, on_done)
        if work < 0:
            raise ValueError(f"negative work {work} on node {node}")
        env = self.env
        job = SoloRun()
        job.callbacks = [on_done]
        job.env = env
        job.since = env.now
        job.work = work
        env.schedule(job, NORMAL, work)
        return job

    def compute(self, node: int, work: float) -> Generator[simpy.Event, object, None]:
        """``yield from hosts.compute(node, seconds)``: compute for ``seconds`` of solo time."""
        if node not in self._groups:
            yield self.env.timeout(work)
            return
        yield from self.job(node, work).run()
