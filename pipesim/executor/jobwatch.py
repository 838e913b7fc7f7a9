"""The launcher's view of its job's ranks on this host, to name a rank that died or stopped without a word.

Every process of a job carries the launcher's pid in its environment (``PIPESIM_LAUNCHER_PID``) and MPICH's
``PMI_RANK``; ``/proc`` (Linux) gives their state. A rank killed outright (``kill -9``, the OOM killer) prints
nothing, and MPICH's banner names only a pid; a stopped rank (SIGSTOP) makes the others time out. ``JobWatch``
samples the ranks while the job runs and, when it failed, says which rank it was, as one line. Elsewhere (no
``/proc``, ranks on other hosts) it sees nothing and says nothing.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


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
        state = stat.rsplit(b")", 1)[1].split()[0].decode()
        if state != "Z":
            found[int(entry.name)] = (int(rank), state)
    return found


@dataclass
class JobWatch:
    """Samples of the job's ranks; ``verdict()`` names the rank that died first or is stopped."""

    launcher_pid: int
    seen: dict[int, int] = field(default_factory=dict)  # pid -> rank, every rank process ever seen
    first_gone: tuple[int, int] | None = None  # (rank, pid) of the first rank that vanished while others ran
    stopped: dict[int, int] = field(default_factory=dict)  # pid -> rank of ranks stopped at the last sample

    def sample(self) -> None:
        live = job_ranks(self.launcher_pid)
        if self.first_gone is None and live:
            gone = [pid for pid in self.seen if pid not in live]
            if gone:
                self.first_gone = (self.seen[gone[0]], gone[0])
        for pid, (rank, _state) in live.items():
            self.seen[pid] = rank
        self.stopped = {pid: rank for pid, (rank, state) in live.items() if state in ("T", "t")}

    def verdict(self, ranks_spoke: bool, banner_pid: int | None = None, banner_exit: int | None = None) -> str | None:
        """One line naming the rank, or None (nothing seen, or the ranks already said what failed).

        ``banner_pid``/``banner_exit``: the pid and exit code of MPICH's "BAD TERMINATION" banner, if any.
        """
        if self.stopped:
            pid, rank = min(self.stopped.items(), key=lambda item: item[1])
            return (f"rank {rank} (pid {pid}) was stopped (SIGSTOP?) and stopped answering; the other ranks "
                    f"timed out waiting for it")
        if ranks_spoke:
            return None
        how = ""
        if banner_exit is not None:
            how = f", exit code {banner_exit}"
            if 0 < banner_exit < 64:
                try:
                    how += f" ({signal.Signals(banner_exit).name}"
                    how += "; the OOM killer?)" if banner_exit == signal.SIGKILL else ")"
                except ValueError:
                    pass
        if banner_pid is not None and banner_pid in self.seen:
            return f"rank {self.seen[banner_pid]} (pid {banner_pid}) died without a word{how}; the job was stopped"
        if self.first_gone is not None:
            rank, pid = self.first_gone
            return f"rank {rank} (pid {pid}) died without a word{how}; the job was stopped"
        return None
