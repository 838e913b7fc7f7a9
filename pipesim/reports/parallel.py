"""Where a sweep's points run: in this process, over local cores, or over MPI ranks under mpiexec."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

PARENT_POLL_S = 0.2  # how often a local worker checks that the sweep process is still there

# Environment variables that MPI launchers set in every rank (Open MPI, MPICH/Hydra and PMIx, MVAPICH).
_WORLD_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE")


def mpi_world_size(environ: dict[str, str] | None = None) -> int:
    """Number of ranks when this process was launched by mpiexec (1 otherwise), read from the environment."""
    environ = os.environ if environ is None else environ
    for name in _WORLD_SIZE_VARIABLES:
        value = environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


def default_jobs() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class SerialExecutor(Executor):
    """Runs each task at once in this process (``--jobs 1``: no pool to start, easy to profile)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(error)
        return future


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)  # the sweep process is gone (killed): nobody wants this worker's results


def worker_init(parent: int) -> None:
    """Set up a local worker process: it ends when the sweep process ends, however that happens (``kill -9``
    included), and leaves SIGINT (Ctrl-C, sent to the whole terminal group) to the sweep process, which ends
    the workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGHUP):  # not the sweep's handlers, inherited by the fork: end quietly
        signal.signal(signum, signal.SIG_DFL)
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()


@dataclass
class Backend:
    """An executor and what it is: ``executor`` is None on MPI worker ranks (they only serve tasks)."""

    executor: Executor | None
    kind: str  # "serial" | "processes" | "mpi"
    workers: int

    def worker_pids(self) -> list[int]:
        """The pids of local worker processes (none for the serial and MPI backends)."""
        processes = getattr(self.executor, "_processes", None) or {}
        return [p.pid for p in list(processes.values()) if p.pid is not None]

    def terminate(self) -> None:
        """Stop now: drop queued tasks and end local workers mid-task (an interrupted sweep)."""
        if self.executor is None or isinstance(self.executor, SerialExecutor):
            return
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        self.executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:  # ProcessPoolExecutor has no public way to stop running tasks (before 3.14)
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=5)


@contextmanager
def open_backend(jobs: int | None = None) -> Iterator[Backend]:
    """MPI ranks when launched under mpiexec with more than one rank, else ``jobs`` local processes."""
    size = mpi_world_size()
    if size > 1:
        try:
            from mpi4py import MPI
            from mpi4py.futures import MPICommExecutor
        except ImportError as error:  # a ValueError, so the CLI prints it as one line
            raise ValueError(f"launched under mpiexec ({size} ranks) but mpi4py is not importable: {error}; "
                               "install pipesim[executor] or run without mpiexec") from None
        with MPICommExecutor(MPI.COMM_WORLD, root=0) as executor:
            yield Backend(executor, "mpi", max(size - 1, 1))
        return
    jobs = default_jobs() if jobs is None else jobs
    if jobs <= 1:
        yield Backend(SerialExecutor(), "serial", 1)
        return
    with ProcessPoolExecutor(max_workers=jobs, initializer=worker_init, initargs=(os.getpid(),)) as executor:
        yield Backend(executor, "processes", jobs)
