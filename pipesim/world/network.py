"""Links of the simulated interconnect: each direction is a FIFO server of latency + bytes/bandwidth."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LinkDirection:
    """One direction of a link. Messages serialise one after another; latency overlaps with the next."""

    name: str
    bandwidth: float
    latency: float
    transport: float = 0.0  # the part of ``latency`` that is the messaging layer's own (measured) latency
    free_at: float = 0.0

    def send(self, now: float, nbytes: float) -> tuple[float, float, float]:
        """Queue a message at ``now``: returns (serialisation start, serialisation end, arrival time)."""
        start = now if now > self.free_at else self.free_at
        end = start + nbytes / self.bandwidth
        self.free_at = end
        return start, end, end + self.latency


class Network:
    """Point-to-point links between nodes, created on first use with per-pair overrides."""

    def __init__(self, node_names: list[str], bandwidth: float, latency: float,
                 overrides: dict[frozenset[int], tuple[float | None, float | None]] | None = None,
                 transport: dict[tuple[int, int], tuple[float, float]] | None = None) -> None:
        """``transport``: per directed pair, (latency, bandwidth) of the messaging layer itself, added in series
        to the link (latencies add, and so do the per-byte times); pairs not listed get the median of those."""
        self.node_names = node_names
        self.bandwidth = bandwidth
        self.latency = latency
        self.overrides = overrides or {}
        self.transport = transport or {}
        if self.transport:
            latencies = sorted(t[0] for t in self.transport.values())
            per_byte = sorted(1.0 / t[1] for t in self.transport.values())
            self._default_transport = (latencies[len(latencies) // 2], per_byte[len(per_byte) // 2])
        self._links: dict[tuple[int, int], LinkDirection] = {}

    def link(self, src: int, dst: int) -> LinkDirection:
        key = (src, dst)
        link = self._links.get(key)
        if link is None:
            bandwidth, latency = self.overrides.get(frozenset(key), (None, None))
            bandwidth = bandwidth if bandwidth is not None else self.bandwidth
            latency = latency if latency is not None else self.latency
            extra_latency = 0.0
            if self.transport:
                extra = self.transport.get(key) or self.transport.get((dst, src))
                extra_latency, extra_per_byte = (extra[0], 1.0 / extra[1]) if extra else self._default_transport
                latency += extra_latency
                bandwidth = 1.0 / (1.0 / bandwidth + extra_per_byte)
            link = LinkDirection(f"{self.node_names[src]}->{self.node_names[dst]}", bandwidth, latency, extra_latency)
            self._links[key] = link
        return link

    def transfer_time(self, src: int, dst: int, nbytes: float) -> float:
        """Unloaded cost of a message: latency + bytes / bandwidth."""
        link = self.link(src, dst)
        return link.latency + nbytes / link.bandwidth
