"""Stages and heads forget cancellations of runs that can no longer come, and still answer as before.

Runs arrive in launch order, which the driver requires to be their ids' order; a stage that has taken run r never
sees a run before it again, so what it remembers of earlier cancellations can go (memory stays flat in long
metrics-only simulations). The answers for the run in hand and for runs still to come must not change.
"""

from __future__ import annotations

import pytest

from pipesim.scheduling.actions import CancelRuns, LaunchRun
from pipesim.scheduling.driver import HeadDriver
from pipesim.scheduling.prefix import GrowingPrefix
from pipesim.scheduling.runs import Run
from pipesim.scheduling.stage import StageMachine


def _run(run_id: int) -> Run:
    return Run(run_id=run_id, tokens=[1], positions=[run_id], seq_ids=(0,), speculative=True)


def test_a_stage_forgets_old_cancellations_but_not_those_still_asked_about():
    machine = StageMachine(1, 3, "n1", [])
    machine.see_cancels(tuple(range(0, 100, 2)), 0.0)  # every even run of 0..98 cancelled ahead
    answers = []
    for i in range(1000):  # the stage takes runs in order; later cancellations come as it goes
        if i % 2 == 0 and i >= 100:
            machine.see_cancels((i,), float(i))  # just before the run arrives
        answers.append(machine.computes(_run(i), True))
        if i % 5 == 0:
            machine.see_cancels((i,), float(i))  # after the run has passed (it was in flight when cancelled)
    # even runs are skipped, odd ones computed, as without forgetting (run 5, 15, ... cancelled only after)
    assert answers == [i % 2 == 1 for i in range(1000)]
    assert len(machine.cancelled) < 150  # about 700 cancellations seen, most forgotten


def test_a_stage_keeps_the_cancellation_of_its_run_in_progress_and_of_later_runs():
    machine = StageMachine(2, 3, "n2", [])
    for i in range(200):  # many runs already passed: forgetting kicks in
        machine.see_cancels((i,), 0.0)
        machine.computes(_run(i), True)
    machine.computes(_run(500), True)
    machine.current = 500
    machine.see_cancels((500, 700), 1.0)  # the run in progress and one still to come
    assert machine.must_abort()
    for i in range(501, 700):
        machine.computes(_run(i), True)
    assert not machine.computes(_run(700), True)


class _Port:
    def __init__(self) -> None:
        self.dropped: list[int] = []
        self.cancels: list[tuple[int, ...]] = []

    def now(self) -> float:
        return 0.0

    def drop(self, run, send_header: bool) -> None:
        self.dropped.append(run.run_id)

    def send_cancel(self, run_ids) -> None:
        self.cancels.append(run_ids)


class _Strategy:
    one_run_in_flight = False
    expects_messages = False

    def on_dropped(self, run_id: int):
        return []


def test_the_head_skips_exactly_the_cancelled_runs_while_forgetting_the_old_ones():
    port = _Port()
    driver = HeadDriver(_Strategy(), port, "n0", 4, [])
    cancelled = {i for i in range(1, 2001) if i % 3 == 0}
    taken = []
    for i in range(1, 2001):
        driver.execute([LaunchRun(_run(i))])
        if i % 3 == 0:
            driver.execute([CancelRuns((i,))])
        if i % 10 == 0:  # the head takes what was launched so far
            while driver.launch_queue:
                run = driver._take_launch()
                if run is not None:
                    taken.append(run.run_id)
    assert port.dropped == sorted(cancelled)
    assert taken == [i for i in range(1, 2001) if i not in cancelled]
    assert len(driver.cancelled) < 200


def test_the_head_refuses_runs_launched_out_of_id_order():
    driver = HeadDriver(_Strategy(), _Port(), "n0", 4, [])
    driver.execute([LaunchRun(_run(5))])
    with pytest.raises(ValueError, match="launched run 3 after run 5"):
        driver.execute([LaunchRun(_run(3))])


def test_a_growing_prefix_reads_as_the_tuple_it_stands_for():
    base = [10, 11, 12, 13]
    view = GrowingPrefix(base, 3, (20, 21))
    base.append(14)  # the committed sequence grows afterwards: the view's first 3 tokens are unchanged
    expected = (10, 11, 12, 20, 21)
    assert len(view) == 5 and tuple(view) == expected and view == expected and view == list(expected)
    assert [view[i] for i in range(-5, 5)] == list(expected * 2)
    for start in range(-6, 7):
        for stop in range(-6, 7):
            assert view[start:stop] == expected[start:stop]
            assert type(view[start:stop]) is tuple
    assert view[::2] == expected[::2]
    with pytest.raises(IndexError):
        view[5]
    with pytest.raises(IndexError):
        view[-6]
    assert hash(view) == hash(expected)
