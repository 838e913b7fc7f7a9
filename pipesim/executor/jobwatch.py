"""The launcher's view of its job's ranks on this host, to name a rank that died or stopped without a word.

Every process of a job carries the launcher's pid in its environment (``PIPESIM_LAUNCHER_PID``) and MPICH's
``PMI_RANK``; ``/proc`` (Linux) gives their state. A rank killed outright (``kill -9``, the OOM killer) prints
nothing, and MPICH's banner names only a pid; a stopped rank (SIGSTOP) makes the others time out. ``JobWatch``
samples the ranks while the job runs and, when it failed, says which rank it was, as one line. Elsewhere (no
``/proc``, ranks on other hosts) it sees nothing and says nothing.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

PROC = Path("/proc")
RESUMED_SAMPLES = 40  # a stopped rank seen running in this many samples in a row was continued, not killed
PF_EXITING = 0x4  # linux/sched.h: set when a task begins to exit, before its files close and before it is a zombie


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def live_state(stat: bytes) -> str | None:
    """The state letter from a ``/proc/PID/stat`` line, or None for a process that is gone in all but name.

    A zombie (``Z``), a dead task (``X``) and one already exiting (``PF_EXITING`` in the flags field) count as
    gone. The flag matters for naming who died first: a killed rank is marked exiting as soon as it acts on the
    signal, and only later, after tearing down its memory, closes its pipes and becomes a zombie; MPICH kills
    the other ranks when it sees those pipes close, and they may become zombies before the victim does.
    """
    fields = stat.rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces and parentheses
    state = fields[0].decode()
    if state in ("Z", "X") or int(fields[6]) & PF_EXITING:
        return None
    return state


def job_ranks(launcher_pid: int) -> dict[int, tuple[int, str]]:
    """pid -> (rank, state letter) of this job's live rank processes on this host (empty without /proc)."""
    if not PROC.is_dir():
        return {}
    marker = f"PIPESIM_LAUNCHER_PID={launcher_pid}".encode()
    found = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        environ = _read(entry / "environ")
        if environ is None or marker not in environ:
            continue
        variables = environ.split(b"\0")
        if marker not in variables:
            continue
        rank = next((v[len(b"PMI_RANK="):] for v in variables if v.startswith(b"PMI_RANK=")), None)
        stat = _read(entry / "stat")
        if rank is None or stat is None or not rank.isdigit():
            continue
        state = live_state(stat)
        if state is not None:
            found[int(entry.name)] = (int(rank), state)
    return found


def _state(pid: int) -> str | None:
    """The state letter of a live process (None: gone, a zombie, or exiting)."""
    stat = _read(PROC / str(pid) / "stat")
    return None if stat is None else live_state(stat)


class JobWatch:
    """Samples the job's ranks from a daemon thread; ``verdict()`` names the rank that died first or is stopped.

    The known ranks' states are read every ``interval`` seconds (a few ``/proc/PID/stat`` reads), and ``/proc``
    is scanned for new ranks every ``scan_every`` seconds. MPICH kills the other ranks soon after one dies and its
    banner may name any of them, so the first sample in which ranks are missing decides; if several went missing
    in that sample, all of them are named.
    """

    def __init__(self, launcher_pid: int, interval: float = 0.005, scan_every: float = 0.5) -> None:
        self.launcher_pid = launcher_pid
        self.interval = interval
        self.scan_every = scan_every
        self.seen: dict[int, int] = {}  # pid -> rank, every rank process ever seen
        self.first_gone: list[tuple[int, int]] = []  # (rank, pid) of the ranks missing in the first such sample
        self.stopped: dict[int, int] = {}  # pid -> rank of the ranks last seen stopped
        self._running: dict[int, int] = {}  # pid -> samples seen running since it was last seen stopped
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pipesim-jobwatch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        next_scan = 0.0
        while not self._halt.is_set():
            try:
                now = time.monotonic()
                full = now >= next_scan or not self.seen
                if full:
                    next_scan = now + self.scan_every
                self.sample(full)
            except Exception:  # noqa: BLE001 - a diagnostic must never break the job it watches
                return
            self._halt.wait(self.interval)

    def sample(self, full: bool = True) -> None:
        """One look at the job's ranks (a full ``/proc`` scan, or only the ranks already known)."""
        if full:
            live = job_ranks(self.launcher_pid)
        else:
            live = {pid: (rank, letter) for pid, rank in self.seen.items()
                    if (letter := _state(pid)) is not None}
        with self._lock:
            if not self.first_gone:  # (if all went at once, all are named)
                gone = {pid for pid in self.seen if pid not in live}
                if gone:  # the reads above are one after another: a rank read alive a moment before the first
                    # gone one may have gone first (a loaded machine preempts between reads), so look once more
                    gone |= {pid for pid in self.seen if _state(pid) is None}
                self.first_gone = sorted((self.seen[pid], pid) for pid in gone)
            for pid, (rank, _letter) in live.items():
                self.seen[pid] = rank
            for pid, (rank, letter) in live.items():  # a stopped rank stays named while it is killed
                if letter in ("T", "t"):
                    self.stopped[pid] = rank
                    self._running[pid] = 0
                elif pid in self.stopped:  # continued (SIGCONT) only if it keeps running a while
                    self._running[pid] = self._running.get(pid, 0) + 1
                    if self._running[pid] >= RESUMED_SAMPLES:
                        del self.stopped[pid]

    def verdict(self, ranks_spoke: bool, banner_exit: int | None = None) -> str | None:
        """One line naming the rank, or None (nothing seen, or the ranks already said what failed).

        ``banner_exit``: the exit code in MPICH's "BAD TERMINATION" banner, if any.
        """
        with self._lock:
            stopped, first_gone = dict(self.stopped), list(self.first_gone)
        if stopped:
            pid, rank = min(stopped.items(), key=lambda item: item[1])
            return (f"rank {rank} (pid {pid}) was stopped (SIGSTOP?) and stopped answering; the other ranks "
                    f"timed out waiting for it")
        if ranks_spoke or not first_gone:
            return None
        how = ""
        if banner_exit is not None and 0 < banner_exit < 64:
            try:
                how = f" ({signal.Signals(banner_exit).name}{'; the OOM killer?' if banner_exit == 9 else ''})"
            except ValueError:
                how = f" (exit code {banner_exit})"
        if len(first_gone) == 1:
            rank, pid = first_gone[0]
            return f"rank {rank} (pid {pid}) died without a word{how}; the job was stopped"
        names = ", ".join(f"{rank} (pid {pid})" for rank, pid in first_gone)
        return f"one of ranks {names} died without a word{how} and the others were ended with it; the job was stopped"
