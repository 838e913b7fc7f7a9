"""Launching an executor job: find ``mpiexec``, build its command line, run it with a time limit.

No MPI here: the front end only checks the scenario and starts ``mpiexec -n N python -m pipesim.executor ...``,
whose output it passes through unchanged.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import ExecutorSetupError

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


def run_job(command: Sequence[str], env: dict[str, str], timeout_s: float) -> int:
    """Run the job, passing its output through; kill the whole job (its process group) past ``timeout_s``."""
    process = subprocess.Popen(list(command), env=env, start_new_session=True)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        print(f"pipesim run: error: the job did not finish within {timeout_s:.0f} s and was stopped",
              file=sys.stderr, flush=True)
        return 124
    except KeyboardInterrupt:
        _kill_group(process)
        raise


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
