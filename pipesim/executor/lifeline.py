"""A rank never outlives its job: it stops when its parent (the MPI process manager) or the launcher is gone.

Two guards, both started before the rank does any work: on Linux the kernel sends SIGKILL when the parent
process ends (``prctl(PR_SET_PDEATHSIG)``), and a daemon thread checks every ``interval`` seconds that the
parent is still the same process and that the ``pipesim run`` launcher (its pid in ``PIPESIM_LAUNCHER_PID``) is
alive; if not, the rank prints one line and exits at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

LAUNCHER_PID_ENV = "PIPESIM_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1
LIFELINE_EXIT = 143


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the watching thread alone
        pass


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, ended but not reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def watch(rank: int, interval: float = 0.5) -> threading.Thread:
    """Start the guards for this rank; returns the watching thread (a daemon)."""
    _set_parent_death_signal()
    parent = os.getppid()
    launcher = int(os.environ.get(LAUNCHER_PID_ENV, "0") or 0)
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval):
            gone = None
            if os.getppid() != parent:
                gone = f"its parent process (pid {parent})"
            elif launcher > 0 and not alive(launcher):
                gone = f"the pipesim run launcher (pid {launcher})"
            if gone is not None:
                sys.stderr.write(f"rank {rank}: stopping: {gone} has ended\n")  # one write: ranks share stderr
                sys.stderr.flush()
                os._exit(LIFELINE_EXIT)

    thread = threading.Thread(target=run, name="pipesim-lifeline", daemon=True)
    thread.start()
    return thread
