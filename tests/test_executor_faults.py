"""Faults and signals: a job never hangs, never outlives its launcher, and names the rank that failed.

Each test starts a real ``pipesim run`` job (2 or 3 MPI ranks), injures it (a signal to the launcher, SIGKILL or
SIGSTOP to one rank) and checks that the launcher exits within the configured ``executor.timeout_s`` plus a
generous margin, that stderr names the rank, and that no process of the job is left. A job's processes are
found through ``/proc``: every one of them (mpiexec, its proxy, the ranks) carries the launcher's pid in its
environment (``PIPESIM_LAUNCHER_PID``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mpi4py")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "scenarios" / "local-tiny.yaml"
TIMEOUT_S = 10  # executor.timeout_s of the injured jobs
MARGIN_S = 30  # on top: interpreter start-up, model loading, a loaded machine; never a speed claim
pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")


def job_processes(launcher_pid: int) -> dict[int, str]:
    """Live processes (pid -> command line) whose environment names this launcher."""
    marker = f"PIPESIM_LAUNCHER_PID={launcher_pid}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == launcher_pid:
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile, or not ours
            continue
        if state != "Z":
            found[int(entry.name)] = cmdline
    return found


def rank_pids(launcher_pid: int) -> list[int]:
    return sorted(pid for pid, cmd in job_processes(launcher_pid).items() if "pipesim.executor" in cmd
                  and "mpiexec" not in cmd and "hydra" not in cmd)


def start_job(*sets: str, ranks: int = 2) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipesim.cli", "run", str(TINY), "--ranks", str(ranks),
               "--set", f"cluster.count={ranks}", "--set", f"executor.timeout_s={TIMEOUT_S}"]
    for assignment in sets:
        command += ["--set", assignment]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_ranks(launcher: subprocess.Popen, n: int, settle_s: float = 1.0) -> list[int]:
    """The ranks' pids once all ``n`` are up (then ``settle_s`` more, so they are past start-up)."""
    give_up = time.monotonic() + MARGIN_S + TIMEOUT_S
    while time.monotonic() < give_up:
        if launcher.poll() is not None:
            out, err = launcher.communicate()
            pytest.fail(f"the job ended before it was injured (exit {launcher.returncode}): {err[-2000:]}")
        pids = rank_pids(launcher.pid)
        if len(pids) == n:
            time.sleep(settle_s)
            return pids
        time.sleep(0.1)
    launcher.kill()
    pytest.fail("the ranks never started")


def finish(launcher: subprocess.Popen) -> tuple[int, str, float]:
    """Wait for the launcher (bounded); (exit code, stderr, seconds waited)."""
    start = time.monotonic()
    try:
        _out, err = launcher.communicate(timeout=TIMEOUT_S + MARGIN_S)
    except subprocess.TimeoutExpired:
        launcher.kill()
        launcher.communicate()
        assert_no_orphans(launcher.pid)  # and kill what is left, for the next test
        pytest.fail(f"the launcher did not exit within {TIMEOUT_S + MARGIN_S} s")
    return launcher.returncode, err, time.monotonic() - start


def assert_no_orphans(launcher_pid: int) -> None:
    """Every process of the job is gone (a few seconds of grace for the kernel to reap them)."""
    give_up = time.monotonic() + MARGIN_S
    left = job_processes(launcher_pid)
    while left and time.monotonic() < give_up:
        time.sleep(0.2)
        left = job_processes(launcher_pid)
    for pid in left:  # do not leave them to the next test
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes of the job outlived it: {left}"


# -- signals to the launcher ----------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_to_the_launcher_ends_every_process_of_the_job(signum):
    launcher = start_job("executor.compute=emulated", "workload.generate_tokens=100000",
                         "executor.timeout_s=600")
    wait_for_ranks(launcher, 2)
    launcher.send_signal(signum)
    code, err, _ = finish(launcher)
    assert code == 128 + signum
    assert f"stopped by {signum.name}" in err
    assert "Traceback" not in err
    assert_no_orphans(launcher.pid)


def test_ranks_stop_when_the_launcher_is_killed_outright():
    """SIGKILL cannot be forwarded: the ranks notice that the launcher is gone and exit, and mpiexec with them."""
    launcher = start_job("executor.compute=emulated", "workload.generate_tokens=100000", "executor.timeout_s=600")
    wait_for_ranks(launcher, 2)
    launcher.kill()
    launcher.communicate(timeout=MARGIN_S)
    assert_no_orphans(launcher.pid)


# -- a rank killed or stopped ---------------------------------------------------------------------------

COMPUTE = {  # long enough that the job is still running when it is injured
    "emulated": ("executor.compute=emulated", "workload.generate_tokens=100000"),
    "real": ("executor.compute=real", "strategy.name=iterative", "workload.generate_tokens=100000",
             "executor.kv_headroom=0"),
}


def rank_of(pid: int) -> int:
    variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in variables if v.startswith(b"PMI_RANK="))[len(b"PMI_RANK="):])


def injure(compute: str, how: str) -> tuple[subprocess.Popen, int]:
    """Start a job and injure its rank 1: ``kill`` (SIGKILL from outside, once the ranks run) or ``stop``
    (``executor.fault_action=stop``: rank 1 sends itself SIGSTOP at its first run, so always mid-generation; a
    stop from outside could land in MPI's start-up collectives, which only the launcher's own limit bounds)."""
    ranks = 3 if compute == "emulated" else 2
    sets = COMPUTE[compute] + (("executor.fault_rank=1", "executor.fault_action=stop") if how == "stop" else ())
    launcher = start_job(*sets, ranks=ranks)
    pids = wait_for_ranks(launcher, ranks, settle_s=2.0 if how == "kill" else 0.0)
    victim = next(pid for pid in pids if rank_of(pid) == 1)
    if how == "kill":
        os.kill(victim, signal.SIGKILL)
    return launcher, victim


@pytest.mark.parametrize("compute", sorted(COMPUTE))
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_killed_or_stopped_rank_ends_the_job_and_is_named(compute, how):
    launcher, victim = injure(compute, how)
    try:
        code, err, _waited = finish(launcher)  # within executor.timeout_s + margin, or the test fails
    finally:
        if victim in job_processes(launcher.pid):
            os.kill(victim, signal.SIGKILL)
    assert code != 0
    assert "Traceback" not in err
    verdicts = [line for line in err.splitlines() if line.startswith("pipesim run: error: ")]
    assert len(verdicts) == 1, err
    if how == "stop":
        assert f"rank 1 (pid {victim}) was stopped" in verdicts[0]
    else:  # named alone, or among the ranks MPICH ended in the same few milliseconds
        assert "died without a word" in verdicts[0] and f"1 (pid {victim})" in verdicts[0]
    assert_no_orphans(launcher.pid)


def test_a_rank_that_times_out_names_whom_it_waited_for():
    """A stopped rank makes the others time out; the head's line says what it awaited and for how long nothing
    came, and the launcher's line names the stopped rank."""
    launcher, victim = injure("emulated", "stop")
    try:
        code, err, _ = finish(launcher)
    finally:
        if victim in job_processes(launcher.pid):
            os.kill(victim, signal.SIGKILL)
    assert code != 0
    head = [line for line in err.splitlines() if line.startswith("rank 0: ExecutorTimeout")]
    assert head, err
    # rank 1 stopped at its first run (the prefill; PipeInfer's reference speculates only after it): nothing came back
    assert re.search(r"predictions of runs \[1[,\]]", head[0]), head[0]
    assert "no message from any rank in" in head[0]
    assert f"pipesim run: error: rank 1 (pid {victim}) was stopped" in err
    assert_no_orphans(launcher.pid)
