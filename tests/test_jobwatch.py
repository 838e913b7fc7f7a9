"""The launcher's naming of a rank that died first, on a fake ``/proc`` (the live job tests are in
test_executor_faults.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipesim.executor import jobwatch
from pipesim.executor.jobwatch import JobWatch, live_state

LAUNCHER = 4242


def stat_line(pid: int, state: str, flags: int = 0x400100, comm: str = "python3") -> bytes:
    """A /proc/PID/stat line in the kernel's layout: pid (comm) state ppid pgrp session tty tpgid flags ..."""
    return f"{pid} ({comm}) {state} 1 {pid} {pid} 0 -1 {flags} 0 0 0 0 5 3 0 0 20 0 4 0".encode()


class FakeProc:
    def __init__(self, root: Path) -> None:
        self.root = root

    def rank(self, pid: int, rank: int, state: str = "S", flags: int = 0x400100) -> None:
        entry = self.root / str(pid)
        entry.mkdir(exist_ok=True)
        environ = [b"PATH=/usr/bin", f"PIPESIM_LAUNCHER_PID={LAUNCHER}".encode(), f"PMI_RANK={rank}".encode()]
        (entry / "environ").write_bytes(b"\0".join(environ) + b"\0")
        (entry / "stat").write_bytes(stat_line(pid, state, flags))

    def remove(self, pid: int) -> None:
        for child in (self.root / str(pid)).iterdir():
            child.unlink()
        (self.root / str(pid)).rmdir()


@pytest.fixture
def proc(tmp_path, monkeypatch) -> FakeProc:
    monkeypatch.setattr(jobwatch, "PROC", tmp_path)
    return FakeProc(tmp_path)


def test_live_state_reads_the_state_after_a_command_name_with_spaces_and_parentheses():
    assert live_state(stat_line(7, "R", comm="a) (b c")) == "R"
    assert live_state(stat_line(7, "T")) == "T"


@pytest.mark.parametrize("state, flags", [("Z", 0x400100), ("X", 0x400100), ("R", 0x400104), ("D", 0x4)])
def test_a_zombie_a_dead_task_or_one_already_exiting_counts_as_gone(state, flags):
    assert live_state(stat_line(7, state, flags)) is None


def test_the_rank_that_began_to_exit_first_is_named_even_if_another_became_a_zombie_first(proc):
    """The failure CI saw: rank 1 was killed, MPICH killed rank 0, and rank 0 was a zombie while rank 1 was still
    tearing down its memory. Rank 1 had been exiting since before rank 0 was touched, so it is the one named."""
    for pid, rank in ((100, 0), (101, 1), (102, 2)):
        proc.rank(pid, rank)
    watch = JobWatch(LAUNCHER)
    watch.sample(full=True)
    proc.rank(101, 1, state="R", flags=0x400104)  # the victim acts on SIGKILL: exiting, not yet a zombie
    watch.sample(full=False)
    proc.rank(100, 0, state="Z")  # then MPICH's kill lands on rank 0, which is reaped first
    proc.remove(100)
    watch.sample(full=True)
    verdict = watch.verdict(ranks_spoke=False, banner_exit=9)
    assert verdict == "rank 1 (pid 101) died without a word (SIGKILL; the OOM killer?); the job was stopped"


def test_ranks_gone_in_the_same_sample_are_all_named(proc):
    for pid, rank in ((100, 0), (101, 1)):
        proc.rank(pid, rank)
    watch = JobWatch(LAUNCHER)
    watch.sample(full=True)
    proc.remove(100)
    proc.rank(101, 1, state="D", flags=0x4)
    watch.sample(full=False)
    verdict = watch.verdict(ranks_spoke=False)
    assert "one of ranks 0 (pid 100), 1 (pid 101) died without a word" in verdict


def test_a_stopped_rank_is_named_as_stopped_and_nothing_is_said_when_the_ranks_spoke(proc):
    for pid, rank in ((100, 0), (101, 1)):
        proc.rank(pid, rank)
    watch = JobWatch(LAUNCHER)
    watch.sample(full=True)
    assert watch.verdict(ranks_spoke=False) is None  # nothing went wrong
    proc.rank(101, 1, state="T")
    watch.sample(full=False)
    assert watch.verdict(ranks_spoke=True).startswith("rank 1 (pid 101) was stopped")
    proc.remove(100)
    watch.sample(full=False)
    assert watch.verdict(ranks_spoke=True).startswith("rank 1 (pid 101) was stopped")


def test_processes_of_another_launcher_are_not_watched(proc):
    proc.rank(100, 0)
    other = proc.root / "200"
    other.mkdir()
    (other / "environ").write_bytes(f"PIPESIM_LAUNCHER_PID={LAUNCHER}1\0PMI_RANK=0\0".encode())
    (other / "stat").write_bytes(stat_line(200, "S"))
    assert jobwatch.job_ranks(LAUNCHER) == {100: (0, "S")}
