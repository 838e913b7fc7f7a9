"""The cluster in a box: namespaces on a bridge, kernel-shaped links, MPI over TCP; every test removes what it
made, also when it fails. Tests that need namespaces skip with the reason where they are not allowed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipesim.executor import netns
from pipesim.executor.netns import NetnsCluster, NetnsUnavailable, netns_unavailable_reason, tbf_arguments

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "scenarios" / "local-tiny.yaml"


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def can_netns():
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces not allowed here: {reason}")


@pytest.fixture
def cluster(can_netns):
    made = NetnsCluster(2, 100e6 / 8, tag=f"pst{os.getpid() % 100000}")
    try:
        yield made.up()
    finally:
        made.down()
        assert made.tag not in _namespaces()


def test_tbf_arguments_by_hand():
    assert tbf_arguments(10e6 / 8) == ["tbf", "rate", "10000000bit", "burst", "8192", "latency", "500ms"]
    assert tbf_arguments(1e9 / 8)[1:5] == ["rate", "1000000000bit", "burst", "125000"]  # 1 ms of traffic
    with pytest.raises(ValueError, match="network.bandwidth"):
        tbf_arguments(0)


def test_the_launch_line_puts_each_rank_in_its_namespace():
    made = NetnsCluster(3, 1e6, tag="psx")
    assert made.launch_command("mpiexec", ["python", "-m", "m"]) == [
        "mpiexec", "-n", "1", "ip", "netns", "exec", "psxr0", "python", "-m", "m", ":",
        "-n", "1", "ip", "netns", "exec", "psxr1", "python", "-m", "m", ":",
        "-n", "1", "ip", "netns", "exec", "psxr2", "python", "-m", "m"]
    env = made.environment({"A": "1"})
    assert env["A"] == "1" and env["FI_PROVIDER"] == "tcp" and env["MPIR_CVAR_NOLOCAL"] == "1"
    assert made.address(0) == "192.0.2.10" and made.address(2) == "192.0.2.12"


def test_namespaces_addresses_and_shaping(cluster):
    listed = _namespaces()
    assert all(cluster.namespace(k) in listed for k in range(2)) and cluster.hub in listed
    for k in range(2):
        addresses = subprocess.run(["ip", "netns", "exec", cluster.namespace(k), "ip", "-4", "addr", "show", "eth0"],
                                   capture_output=True, text=True).stdout
        assert f"inet {cluster.address(k)}/24" in addresses
        qdisc = subprocess.run(["ip", "netns", "exec", cluster.namespace(k), "tc", "qdisc", "show", "dev", "eth0"],
                               capture_output=True, text=True).stdout
        assert "tbf" in qdisc and "100Mbit" in qdisc
    # nothing of ours leaks into the root namespace
    root_links = subprocess.run(["ip", "link", "show"], capture_output=True, text=True).stdout
    assert cluster.tag not in root_links


def test_a_failing_set_up_removes_what_it_made(can_netns, monkeypatch):
    made = NetnsCluster(2, 1e6, tag=f"psf{os.getpid() % 100000}")
    calls = []
    real = netns._ip

    def failing(*args, ns=None):
        calls.append(args)
        if args[:2] == ("ip", "addr"):
            raise NetnsUnavailable("injected failure")
        real(*args, ns=ns)

    monkeypatch.setattr(netns, "_ip", failing)
    with pytest.raises(NetnsUnavailable, match="injected"):
        made.up()
    assert made.tag not in _namespaces() and len(calls) > 3
    assert made.tag not in subprocess.run(["ip", "link", "show"], capture_output=True, text=True).stdout


def test_run_netns_refused_is_one_clear_line(monkeypatch, capsys):
    from pipesim import cli

    monkeypatch.setattr(netns, "netns_unavailable_reason", lambda: "network namespaces need root (test)")
    code = cli.main(["run", str(TINY), "--ranks", "2", "--netns"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "pipesim run: error: --netns: network namespaces need root (test)"


@pytest.mark.mpi
def test_mpi_over_tcp_through_the_shaped_links(cluster, tmp_path):
    """A generation whose messages went through the kernel-shaped eth0 of both ranks (shared memory would leave
    the qdiscs' byte counters near zero), with target-only output."""
    from pipesim.executor.launcher import find_mpiexec, rank_environment

    saved = tmp_path / "t.json"
    program = [sys.executable, "-m", "pipesim.executor", str(TINY), "--ranks", "2", "--save-trace", str(saved),
               "--set", "strategy.name=speculative", "--set", "workload.generate_tokens=10"]
    before = [cluster.sent_bytes(k) for k in range(2)]
    result = subprocess.run(cluster.launch_command(find_mpiexec(), program), capture_output=True, text=True,
                            timeout=180, env=cluster.environment(rank_environment(1)), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    entry = json.loads(saved.read_text())[0]
    assert entry["trace"]["meta"]["matches_reference"] is True
    logits = 10 * 256 * 4  # at least one float32 logits row of the tiny vocabulary per generated token, rank 1 -> 0
    assert cluster.sent_bytes(1) - before[1] > logits
    assert cluster.sent_bytes(0) - before[0] > 0


def test_namespaces_of_dead_processes_are_removed_and_live_ones_kept(can_netns):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead, live = f"ps{gone.pid}h", f"ps{os.getpid()}r7"
    try:
        for name in (dead, live):
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        assert netns.remove_stale_namespaces() == [dead]
        listed = _namespaces()
        assert dead not in listed and live in listed
    finally:
        for name in (dead, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.mpi
def test_a_terminated_netns_run_stops_its_job_and_removes_its_namespaces(can_netns):
    marker = f"workload.seed={700000 + os.getpid()}"  # finds this job's ranks among other jobs' processes
    front = subprocess.Popen([sys.executable, "-m", "pipesim.cli", "run", str(TINY), "--ranks", "2", "--netns",
                              "--netns-bandwidth", "1Mbit/s", "--set", "workload.generate_tokens=2000",
                              "--set", "executor.kv_headroom=0", "--set", "strategy.name=iterative",
                              "--set", marker],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tag = f"ps{front.pid}"
    try:
        deadline = time.monotonic() + 120
        while tag not in _namespaces() and front.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tag in _namespaces(), "the run never set its namespaces up"
        time.sleep(3)  # let the ranks start
        front.send_signal(signal.SIGTERM)
        _, err = front.communicate(timeout=60)
    finally:
        if front.poll() is None:
            front.kill()
            front.wait()
        netns.remove_stale_namespaces()
    assert front.returncode == 128 + signal.SIGTERM and "namespaces were removed" in err
    assert tag not in _namespaces()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert marker not in ps  # no rank outlived its launcher
