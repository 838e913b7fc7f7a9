"""A cluster in a box over real TCP: each rank in its own Linux network namespace, links shaped by the kernel.

``NetnsCluster`` builds, for ``n`` ranks, one namespace per rank and a hub namespace holding a bridge (the switch);
rank ``k``'s ``eth0`` (address 192.0.2.(10+k)/24, a documentation range) is one end of a veth pair whose other end
is a port of the bridge. Both directions of every rank's link are shaped with ``tc ... tbf`` (the rank's egress on
its ``eth0``, its ingress on the bridge port), at the scenario's ``network.bandwidth``. Kernel delay (``netem``) is
not used: latency stays emulated by the executor. MPI runs over TCP between the namespaces (MPICH ch4 with the
libfabric ``tcp`` provider on ``eth0``, every process treated as on another node, so no shared memory): the
launcher starts ``mpiexec -n 1 ip netns exec NS_0 python ... : -n 1 ip netns exec NS_1 python ...``, and mpiexec's
own control traffic reaches each rank through inherited file descriptors. Root only; names carry the creating
process id, and ``down`` (also on any failure, as a context manager) deletes every namespace, which removes its
veth ends, qdiscs and the bridge.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from .lifeline import alive

SUBNET = "192.0.2"  # TEST-NET-1 (RFC 5737): never routed, only on the veth ends we create
FIRST_HOST = 10
MPI_TCP_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": "eth0",
               "MPIR_CVAR_NOLOCAL": "1", "UCX_TLS": "tcp", "UCX_NET_DEVICES": "eth0"}


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip``/``tc``, or the kernel refuses)."""


def _ip(*args: str, ns: str | None = None) -> None:
    command = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(command)}` failed: {result.stderr.strip() or result.returncode}")


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (one line), or None when they can (creates and deletes a probe one)."""
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run as root or without --netns"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"pscheck{os.getpid()}"
    try:
        _ip("ip", "netns", "add", probe)
    except NetnsUnavailable as error:
        return str(error)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


STALE_NAME = re.compile(r"^ps(\d+)(h|r\d+)$")  # the names NetnsCluster gives, with its creator's pid


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces a ``NetnsCluster`` of a process that no longer exists left behind (killed before it could
    tear them down); returns their names. Namespaces of live processes, and any other names, are left alone."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    removed = []
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        match = STALE_NAME.match(name)
        if match is None or alive(int(match.group(1))):
            continue
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        removed.append(name)
    return removed



def tbf_arguments(bandwidth_bytes_per_s: float) -> list[str]:
    """``tc qdisc ... tbf`` arguments for a link of this bandwidth: the rate in bit/s, a bucket of 1 ms of traffic
    (at least 8 KiB, so a full-size frame always fits), and a queue of 500 ms (no drops at any rate)."""
    if bandwidth_bytes_per_s <= 0:
        raise ValueError(f"network.bandwidth must be > 0 for a shaped link, got {bandwidth_bytes_per_s}")
    rate_bits = int(bandwidth_bytes_per_s * 8)
    burst = max(8192, int(bandwidth_bytes_per_s * 1e-3))
    return ["tbf", "rate", f"{rate_bits}bit", "burst", str(burst), "latency", "500ms"]


@dataclass
class NetnsCluster:
    """``n_ranks`` namespaces on a bridge, each rank's link shaped to ``bandwidth`` (bytes/s)."""

    n_ranks: int
    bandwidth: float
    tag: str = field(default_factory=lambda: f"ps{os.getpid()}")
    created: list[str] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"{self.tag}h"

    def namespace(self, rank: int) -> str:
        return f"{self.tag}r{rank}"

    def address(self, rank: int) -> str:
        return f"{SUBNET}.{FIRST_HOST + rank}"

    def up(self) -> NetnsCluster:
        """Create the namespaces, the bridge, the veth pairs, the addresses and the shaping."""
        if not 1 <= self.n_ranks <= 200:
            raise ValueError(f"netns: {self.n_ranks} ranks, must be 1..200 (one address each in {SUBNET}.0/24)")
        shape = tbf_arguments(self.bandwidth)
        try:
            self._add_namespace(self.hub)
            _ip("ip", "link", "add", "br0", "type", "bridge", ns=self.hub)
            _ip("ip", "link", "set", "br0", "up", ns=self.hub)
            for k in range(self.n_ranks):
                ns, end, port = self.namespace(k), f"{self.tag}v{k}", f"{self.tag}p{k}"
                self._add_namespace(ns)
                _ip("ip", "link", "add", end, "type", "veth", "peer", "name", port)
                _ip("ip", "link", "set", end, "netns", ns)
                _ip("ip", "link", "set", port, "netns", self.hub)
                _ip("ip", "link", "set", end, "name", "eth0", ns=ns)
                _ip("ip", "addr", "add", f"{self.address(k)}/24", "dev", "eth0", ns=ns)
                _ip("ip", "link", "set", "eth0", "up", ns=ns)
                _ip("ip", "link", "set", "lo", "up", ns=ns)
                _ip("ip", "link", "set", port, "master", "br0", ns=self.hub)
                _ip("ip", "link", "set", port, "up", ns=self.hub)
                _ip("tc", "qdisc", "add", "dev", "eth0", "root", *shape, ns=ns)
                _ip("tc", "qdisc", "add", "dev", port, "root", *shape, ns=self.hub)
        except BaseException:
            self.down()
            raise
        return self

    def _add_namespace(self, name: str) -> None:
        _ip("ip", "netns", "add", name)
        self.created.append(name)

    def down(self) -> None:
        """Delete every namespace this cluster made (their links, qdiscs and bridge go with them)."""
        while self.created:
            name = self.created.pop()
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        for k in range(self.n_ranks):  # a veth end not yet moved into a namespace lives in the root one
            subprocess.run(["ip", "link", "del", f"{self.tag}v{k}"], capture_output=True, timeout=30)

    def __enter__(self) -> NetnsCluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def sent_bytes(self, rank: int) -> int:
        """Bytes the shaper on rank ``rank``'s egress has sent (``tc -s qdisc``)."""
        result = subprocess.run(["ip", "netns", "exec", self.namespace(rank), "tc", "-s", "qdisc", "show", "dev",
                                 "eth0"], capture_output=True, text=True, timeout=30)
        match = re.search(r"Sent (\d+) bytes", result.stdout)
        return int(match.group(1)) if match else 0

    def launch_command(self, mpiexec: str, program: Sequence[str]) -> list[str]:
        """``mpiexec -n 1 ip netns exec NS_0 <program> : -n 1 ip netns exec NS_1 <program> : ...``."""
        command = [mpiexec]
        for k in range(self.n_ranks):
            if k:
                command.append(":")
            command += ["-n", "1", "ip", "netns", "exec", self.namespace(k), *program]
        return command

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        """The ranks' environment: MPI over TCP on ``eth0``, no shared memory between ranks."""
        return {**base, **MPI_TCP_ENV}


def run_in_netns(n_ranks: int, rank_args: Sequence[str], bandwidth: float, threads: int, limit_s: float) -> int:
    """``pipesim run --netns``: set the namespaces up, run the job in them over TCP, tear them down (always, also
    on SIGTERM; namespaces a killed run left behind are removed first)."""
    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"pipesim run: error: --netns: {reason}", file=sys.stderr, flush=True)
        return 2
    stale = remove_stale_namespaces()
    if stale:
        print(f"pipesim run: removed network namespaces left by processes that no longer exist: {', '.join(stale)}",
              file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGTERM, _terminate)  # a terminated front end still tears the namespaces down
    try:
        code = _run(n_ranks, rank_args, bandwidth, threads, limit_s)
    except _Terminated:  # SIGTERM before the job started: nothing runs yet, the namespaces are removed
        code = 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code > 128:  # run_job ended the job on a signal; leaving NetnsCluster removed the namespaces
        print(f"pipesim run: stopped by {signal.Signals(code - 128).name}; its network namespaces were removed",
              file=sys.stderr, flush=True)
    return code


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the front end waits, so the job is killed and the namespaces torn down."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def _run(n_ranks: int, rank_args: Sequence[str], bandwidth: float, threads: int, limit_s: float) -> int:
    from ..units import format_bandwidth
    from .launcher import find_mpiexec, rank_environment, run_job

    with NetnsCluster(n_ranks, bandwidth) as cluster:
        print(f"pipesim run: {n_ranks} ranks in network namespaces {cluster.tag}r0..{n_ranks - 1} "
              f"({SUBNET}.{FIRST_HOST}-{FIRST_HOST + n_ranks - 1}), MPI over TCP, each link shaped to "
              f"{format_bandwidth(bandwidth)} by tc tbf (latency: emulated or none)", file=sys.stderr, flush=True)
        command = cluster.launch_command(find_mpiexec(), [sys.executable, "-m", "pipesim.executor", *rank_args])
        return run_job(command, cluster.environment(rank_environment(threads)), limit_s)
