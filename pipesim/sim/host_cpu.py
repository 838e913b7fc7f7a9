"""Nodes that share a host: compute slows down while several of them compute at once.

When the executor's ranks share one machine (this project's 2-core development box, or several ranks per node on
a cluster), a stage computing while another rank on the same host computes runs slower: cores, caches and
memory bandwidth are shared. ``pipesim calibrate`` measures that as a per-node ``concurrent_slowdown``: the
ratio of a stage's compute time with every rank of its host computing to its time alone.

The model is processor sharing: a node's job progresses at rate 1 alone and ``1 / slowdown(k)`` while ``k``
jobs of its host run, with ``slowdown(k) = 1 + (s - 1)(k - 1)`` (``s`` measured at k = 2). Rates change
whenever a job of the host starts or ends, so partial overlaps are charged exactly. Nodes on a host of their
own (or with ``s = 1``) take the plain path: one timeout, no extra events.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import simpy

__all__ = ["ComputeJob", "SharedHosts"]

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

    def compute(self, node: int, work: float) -> Generator[simpy.Event, object, None]:
        """``yield from hosts.compute(node, seconds)``: compute for ``seconds`` of solo time."""
        if node not in self._groups:
            yield self.env.timeout(work)
            return
        yield from self.job(node, work).run()
