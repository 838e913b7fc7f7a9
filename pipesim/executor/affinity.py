"""Binding a rank to one core (``executor.pin_ranks``) and finding its rank on its host.

A rank pins itself at start-up with ``os.sched_setaffinity``: core ``local_rank mod n`` of the CPU set it was
allowed (so a job under a batch system's cpuset stays inside it), where the local rank counts the ranks on the
same host; with ``executor.threads_per_rank`` t > 1, t consecutive cores, one per torch thread. Where affinity cannot be set (not Linux), pinning says so and the rank runs unpinned.
"""

from __future__ import annotations

import os


def local_rank(comm) -> int:
    """This rank's index among the ranks of its host (MPI's shared-memory split; collective over ``comm``)."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank()
    finally:
        node.Free()


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on, in order ([] where the OS does not say)."""
    if not hasattr(os, "sched_getaffinity"):
        return []
    return sorted(os.sched_getaffinity(0))


def core_for(index: int, cpus: list[int]) -> int:
    """The core of the rank with host index ``index`` among ``cpus`` (round robin when ranks outnumber cores)."""
    if not cpus:
        raise ValueError("no allowed CPUs to pin to")
    return cpus[index % len(cpus)]


def cores_for(index: int, cpus: list[int], width: int = 1) -> list[int]:
    """The ``width`` cores (one per torch thread) of the rank with host index ``index``: consecutive in ``cpus``,
    round robin when the ranks' threads outnumber them."""
    return sorted({core_for(index * width + j, cpus) for j in range(width)})


def pin_to_core(index: int, cpus: list[int] | None = None, width: int = 1) -> int | None:
    """Bind this process to ``cores_for(index, cpus, width)``; returns the first core, or None where affinity is
    not supported. ``cpus`` defaults to the allowed set."""
    cpus = allowed_cpus() if cpus is None else cpus
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return None
    cores = cores_for(index, cpus, width)
    os.sched_setaffinity(0, set(cores))
    return cores[0]
