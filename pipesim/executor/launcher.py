"""Launching an executor job: find ``mpiexec``, build its command line, run it with a time limit.

No MPI here: the front end only checks the scenario and starts ``mpiexec -n N python -m pipesim.executor ...``,
whose output it passes through unchanged.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import ExecutorSetupError
from .jobwatch import JobWatch
from .lifeline import LAUNCHER_PID_ENV  # the ranks stop when this process is gone

START_MARGIN_S = 60.0  # on top of the generations' time limits: interpreter start-up and model loading


def find_mpiexec() -> str:
    """``mpiexec`` next to the running Python first (the ``mpich`` wheel installs it there), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise ExecutorSetupError("mpiexec not found next to the Python interpreter or on PATH "
                                 "(pip install mpich mpi4py)")
    return found


def launch_command(n_ranks: int, rank_args: Sequence[str], mpiexec: str | None = None) -> list[str]:
    """``mpiexec -n N python -m pipesim.executor <rank_args>``."""
    return [mpiexec or find_mpiexec(), "-n", str(n_ranks), sys.executable, "-m", "pipesim.executor", *rank_args]


def rank_environment(threads_per_rank: int) -> dict[str, str]:
    """The environment of the ranks: one BLAS/OpenMP pool of ``threads_per_rank`` threads each."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads_per_rank)
    return env


FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WAIT_INTERVAL_S = 0.05  # how often the launcher checks that mpiexec still runs
RANK_LINE = re.compile(rb"^rank \d+: ")  # a rank's own failure line (entry.py)
BANNER_EXIT = re.compile(rb"^=\s+EXIT CODE: (\d+)")
STOP_GRACE_S = 5.0  # after SIGTERM, the job's processes have this long before SIGKILL


class JobStopped(Exception):
    """The launcher got a signal (``signum``) and ended the job."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_job(command: Sequence[str], env: dict[str, str], timeout_s: float) -> int:
    """Run the job, passing its output through; kill the whole job (its process group) past ``timeout_s``.

    SIGTERM, SIGINT and SIGHUP to this process end the job's process group (SIGTERM, then SIGKILL after
    ``STOP_GRACE_S``) and return ``128 + signal``; the ranks also watch this process (``LAUNCHER_PID_ENV``), so
    they stop even if it is killed outright.
    """
    env = {**env, LAUNCHER_PID_ENV: str(os.getpid())}

    def stop(signum: int, _frame) -> None:
        raise JobStopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in FORWARDED_SIGNALS}
    process = None
    watch = JobWatch(os.getpid())
    relays: list[_Relay] = []
    try:
        process = subprocess.Popen(list(command), env=env, start_new_session=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        relays = [_Relay(process.stdout, sys.stdout), _Relay(process.stderr, sys.stderr)]
        give_up = time.monotonic() + timeout_s
        watch.start()
        while process.poll() is None:
            if time.monotonic() > give_up:
                raise subprocess.TimeoutExpired(command, timeout_s)
            time.sleep(WAIT_INTERVAL_S)
        code = process.returncode
        watch.stop()
        for relay in relays:
            relay.join()
        if code != 0:
            spoke = any(relay.ranks_spoke for relay in relays)
            bad_exit = next((r.bad_exit for r in relays if r.bad_exit is not None), None)
            verdict = watch.verdict(spoke, bad_exit)
            if verdict is not None:
                print(f"pipesim run: error: {verdict}", file=sys.stderr, flush=True)
        return code
    except subprocess.TimeoutExpired:
        watch.stop()
        _kill_group(process)
        verdict = watch.verdict(True)
        why = f" ({verdict})" if verdict else ""
        print(f"pipesim run: error: the job did not finish within {timeout_s:.0f} s and was stopped{why}",
              file=sys.stderr, flush=True)
        return 124
    except (JobStopped, KeyboardInterrupt) as stopped:
        signum = stopped.signum if isinstance(stopped, JobStopped) else signal.SIGINT
        for sig in FORWARDED_SIGNALS:  # a second signal must not interrupt the clean-up
            signal.signal(sig, signal.SIG_IGN)
        if process is not None:
            _kill_group(process)
        print(f"pipesim run: stopped by {signal.Signals(signum).name}; the job's processes were ended",
              file=sys.stderr, flush=True)
        return 128 + int(signum)
    finally:
        watch.stop()
        for relay in relays:
            relay.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Relay:
    """Copies one of the job's output streams to ours line by line, noting whether a rank reported its own
    failure (``rank K: ...``) and the exit code in MPICH's "BAD TERMINATION" banner (its pid may be any rank's)."""

    def __init__(self, stream, out) -> None:
        self.stream = stream
        self.out = out
        self.ranks_spoke = False
        self.bad_exit: int | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="pipesim-relay", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        binary = getattr(self.out, "buffer", None)
        for line in iter(self.stream.readline, b""):
            if RANK_LINE.match(line):
                self.ranks_spoke = True
            if (match := BANNER_EXIT.search(line)) and self.bad_exit is None:
                self.bad_exit = int(match.group(1))
            if self.closed:
                continue  # keep draining, so the job never blocks on a full pipe
            try:
                if binary is not None:
                    binary.write(line)
                    binary.flush()
                else:
                    self.out.write(line.decode(errors="replace"))
                    self.out.flush()
            except (OSError, ValueError):  # our reader went away (e.g. `| head`): drop the rest
                self.closed = True

    def join(self) -> None:
        self.thread.join(timeout=STOP_GRACE_S)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=STOP_GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:  # whatever is left of the group (ranks that ignored SIGTERM), even after mpiexec itself ended
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
