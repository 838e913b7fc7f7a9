"""Nodes sharing a host: processor sharing with the calibrated concurrent slowdown."""

from __future__ import annotations

import pytest
import simpy

from pipesim.metrics import compute_metrics
from pipesim.scenario import load_scenario
from pipesim.sim import simulate
from pipesim.sim.host_cpu import SharedHosts
from pipesim.sim.polling import PollBackoff
from pipesim.world.profile import HardwareProfile, NodeCoefficients


def _finish_times(hosts_of, slowdown, jobs):
    """Run ``jobs`` = [(node, start, work)]; returns each job's end time."""
    env = simpy.Environment()
    hosts = SharedHosts(env, hosts_of, slowdown)
    ends = [None] * len(jobs)

    def one(i, node, start, work):
        yield env.timeout(start)
        yield from hosts.compute(node, work)
        ends[i] = env.now

    for i, (node, start, work) in enumerate(jobs):
        env.process(one(i, node, start, work))
    env.run()
    return ends


def test_overlapping_jobs_on_one_host_share_it():
    # A alone 0-5 (5 done), both at rate 1/1.5 until A's last 5 are done (t=12.5, B has done 5), B alone to 17.5
    ends = _finish_times(["h", "h"], [1.5, 1.5], [(0, 0.0, 10.0), (1, 5.0, 10.0)])
    assert ends == pytest.approx([12.5, 17.5])


def test_three_jobs_extrapolate_the_pairwise_slowdown():
    ends = _finish_times(["h"] * 3, [2.0] * 3, [(i, 0.0, 3.0) for i in range(3)])
    assert ends == pytest.approx([9.0, 9.0, 9.0])  # slowdown(3) = 1 + (2 - 1) * 2 = 3


def test_separate_hosts_or_no_slowdown_leave_times_alone():
    assert _finish_times(["a", "b"], [2.0, 2.0], [(0, 0.0, 4.0), (1, 1.0, 4.0)]) == pytest.approx([4.0, 5.0])
    assert _finish_times(["h", "h"], [1.0, 1.0], [(0, 0.0, 4.0), (1, 1.0, 4.0)]) == pytest.approx([4.0, 5.0])
    assert _finish_times([None, None], [3.0, 3.0], [(0, 0.0, 4.0), (1, 1.0, 4.0)]) == pytest.approx([4.0, 5.0])


def test_an_interrupted_job_reports_the_work_it_did():
    env = simpy.Environment()
    hosts = SharedHosts(env, ["h", "h"], [2.0, 2.0])
    job = hosts.job(0, 10.0)
    seen = {}

    def worker():
        try:
            yield from job.run()
        except simpy.Interrupt:
            seen["done"], seen["at"] = job.done, env.now

    def other():
        yield from hosts.compute(1, 100.0)

    process = env.process(worker())
    env.process(other())

    def stop():
        yield env.timeout(4.0)
        process.interrupt()

    env.process(stop())
    env.run(until=50)
    assert seen == {"done": pytest.approx(2.0), "at": 4.0}  # both ran at half speed


def test_slowdown_below_one_is_rejected():
    with pytest.raises(ValueError, match="node 1: concurrent_slowdown must be >= 1, got 0.5"):
        SharedHosts(simpy.Environment(), ["h", "h"], [1.0, 0.5])


def _profile(tmp_path, slowdown: float, host_of) -> str:
    nodes = {f"n{i}": NodeCoefficients(overhead=1e-4, layer_fixed=1e-3, layer_per_token=2e-4, head_fixed=2e-3,
                                       head_per_output=5e-4, draft_fixed=3e-3, draft_per_token=1e-4,
                                       draft_per_token_context=0.0, host=host_of(i), concurrent_slowdown=slowdown)
             for i in range(4)}
    return str(HardwareProfile("llama-2-7b", nodes, {}, verify_overhead=1e-4).save(tmp_path / f"p{slowdown}.yaml"))


def _tokens_per_s(profile: str, strategy: str) -> float:
    scenario = load_scenario("pipesim/data/default.yaml", [f"cluster.profile={profile}", f"strategy.name={strategy}",
                                                           "workload.generate_tokens=40", "acceptance.alpha=0.6"])
    return compute_metrics(simulate(scenario))["tokens_per_s"]


def test_shared_host_slows_overlapping_pipelines_but_not_iterative(tmp_path):
    one_host = [_profile(tmp_path, s, lambda i: "box") for s in (1.0, 1.6)]
    # iterative never computes on two nodes at once: identical to the last bit
    assert _tokens_per_s(one_host[1], "iterative") == _tokens_per_s(one_host[0], "iterative")
    # PipeInfer overlaps stages all the time: slower when they share a host
    plain, shared = (_tokens_per_s(p, "pipeinfer") for p in one_host)
    assert shared < 0.95 * plain
    # the same slowdown on separate hosts changes nothing
    apart = _profile(tmp_path / "apart", 1.6, lambda i: f"box{i}")
    assert _tokens_per_s(apart, "pipeinfer") == plain


# -- the executor's idle polling ----------------------------------------------------------------------------


def test_poll_backoff_probe_times():
    poll = PollBackoff(first=50e-6, longest=500e-6, overshoot=60e-6)
    assert poll.noticed(1.0, 0.5) == 1.0  # already there when it starts waiting: seen at once
    # probes at +110, +270, +530, +990 us (doubling sleeps, each 60 us late), then every 560 us
    for arrival, seen in ((1e-5, 110e-6), (110e-6, 110e-6), (2e-4, 270e-6), (1e-3, 1550e-6), (5e-3, 5470e-6)):
        assert poll.noticed(0.0, arrival) == pytest.approx(seen), arrival
    late = [poll.noticed(0.0, a) - a for a in (0.0123, 0.5, 7.77)]
    assert all(0 <= d <= 560e-6 + 1e-12 for d in late)
    with pytest.raises(ValueError, match="0 < first <= longest"):
        PollBackoff(first=1e-3, longest=1e-4)


def test_a_message_held_by_link_emulation_is_taken_at_its_arrival():
    poll = PollBackoff(first=1.0, longest=4.0)  # probes at 0, 1, 3, 7, 11, ...
    assert poll.noticed(0.0, 3.5) == 7.0  # arriving between probes: seen at the next one
    # MPI delivered it at 2 and the emulated link holds it until 3.5: found at the probe at 3, taken at 3 + first
    assert poll.noticed_held(0.0, 2.0, 3.5) == 4.0
    assert poll.noticed_held(0.0, 2.0, 3.2) == 4.0  # found just before it is due: a sleep is at least ``first``
    assert poll.noticed_held(0.0, 2.0, 3.0) == 3.0  # found as it is due: taken at once
    assert poll.noticed_held(0.0, 5.0, 6.0) == 7.0  # found after its arrival: taken when found
    late = PollBackoff(first=1.0, longest=4.0, overshoot=0.25)  # probes at 0, 1.25, 3.5, 7.75, ...
    assert late.noticed_held(0.0, 3.0, 5.0) == 5.25  # found at 3.5, sleeps until 5, wakes 0.25 late


def test_polling_delays_idle_ranks_in_the_simulator(tmp_path):
    def profile(poll):
        nodes = {f"n{i}": NodeCoefficients(overhead=1e-4, layer_fixed=1e-3, layer_per_token=2e-4, head_fixed=2e-3,
                                           head_per_output=5e-4, host=f"box{i}") for i in range(4)}
        return str(HardwareProfile("llama-2-7b", nodes, {}, poll=poll).save(tmp_path / f"p{bool(poll)}.yaml"))

    poll = {"first": 50e-6, "longest": 500e-6, "overshoot": 60e-6}
    plain = _tokens_per_s(profile(None), "iterative")
    polled = _tokens_per_s(profile(poll), "iterative")
    # every hop of the iterative ring wakes an idle rank: 4 hops, each seen up to one probe period late
    extra = 1 / polled - 1 / plain
    assert 0 < extra <= 4 * 560e-6 + 1e-9
    assert HardwareProfile.load(tmp_path / "pTrue.yaml").poll == poll
