"""Hardware profiles: fitted cost coefficients per node and per link, which scenarios reference instead of the
roofline defaults (``cluster.profile: FILE``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..yamlio import YAMLFileError, read_yaml


def layer_form(c, n_tokens: int, context: int) -> float:
    """The time of one layer for a run of ``n_tokens`` at ``context``, for coefficients ``c`` (a StageFit or a
    profile's node)."""
    if n_tokens == 1 and c.layer_single is not None:
        return c.layer_single + c.layer_per_token_context * context
    return c.layer_fixed + c.layer_per_token * n_tokens + c.layer_per_token_context * n_tokens * context


def stage_form(c, n_layers: int, n_tokens: int, context: int, n_outputs: int) -> float:
    """The stage time of the fitted form for coefficients ``c`` (a StageFit or a profile's node)."""
    t = c.overhead + n_layers * layer_form(c, n_tokens, context)
    if n_outputs == 1 and c.head_single is not None:
        t += c.head_single
    elif n_outputs:
        t += c.head_fixed + c.head_per_output * n_outputs
    return t


PROFILE_FORMAT = "pipesim-hardware-profile/1"


@dataclass
class NodeCoefficients:
    """Fitted costs of one node (seconds): ``layer_form`` and ``stage_form`` below (fitted by
    ``pipesim.calibration.fit``)."""

    overhead: float = 0.0
    layer_fixed: float = 0.0
    layer_per_token: float = 0.0
    layer_per_token_context: float = 0.0
    head_fixed: float = 0.0
    head_per_output: float = 0.0
    layer_single: float | None = None  # per-layer fixed cost of a 1-token run (None: the general form)
    head_single: float | None = None  # output head for 1 prediction (None: the general form)
    draft_fixed: float | None = None
    draft_per_token: float | None = None
    draft_per_token_context: float | None = None
    host: str = ""
    dispatch: float = 0.0  # per-run messaging/scheduling the microbenchmarks miss: the node is busy, not computing
    concurrent_slowdown: float = 1.0  # compute time x this while another rank of the same host computes
    kv_transaction: float | None = None  # one relayed KV transaction (PipeInfer's reference); None: the scenario's

    def stage_time(self, n_layers: int, n_tokens: int, context: int, n_outputs: int) -> tuple[float, float]:
        """(total, per-layer) time of a run on a stage of this node (``dispatch`` not included)."""
        return stage_form(self, n_layers, n_tokens, context, n_outputs), layer_form(self, n_tokens, context)

    def draft_time(self, n_tokens: int, context: int) -> float:
        if self.draft_fixed is None:
            raise ValueError(f"the profile has no draft coefficients for host {self.host or '?'}")
        return (self.draft_fixed + (self.draft_per_token or 0.0) * n_tokens
                + (self.draft_per_token_context or 0.0) * n_tokens * context)


def kv_transaction_time(profile: HardwareProfile | None, node: str, default: float) -> float:
    """Seconds a node spends on one relayed KV transaction: the profile's term when it has one, else ``default``
    (``cluster.kv_transaction_time``)."""
    if profile is not None and node in profile.nodes and profile.nodes[node].kv_transaction is not None:
        return profile.nodes[node].kv_transaction
    return default


@dataclass
class LinkCoefficients:
    latency: float
    bandwidth: float  # bytes per second


@dataclass
class HardwareProfile:
    """What ``pipesim calibrate`` measured: per-node and per-link coefficients, with provenance."""

    model: str
    nodes: dict[str, NodeCoefficients]
    links: dict[str, LinkCoefficients] = field(default_factory=dict)
    verify_overhead: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    poll: dict[str, float] | None = None  # the executor's idle polling: first, longest, overshoot (seconds)

    def node(self, name: str) -> NodeCoefficients:
        try:
            return self.nodes[name]
        except KeyError:
            raise ValueError(f"the profile has no node {name!r} (it has {', '.join(self.nodes)})") from None

    def link(self, src: str, dst: str) -> LinkCoefficients | None:
        return self.links.get(f"{src}->{dst}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": PROFILE_FORMAT, "model": self.model, "verify_overhead": self.verify_overhead,
                "nodes": {k: asdict(v) for k, v in self.nodes.items()},
                "links": {k: asdict(v) for k, v in self.links.items()}, "poll": self.poll, "meta": self.meta}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> HardwareProfile:
        path = Path(path)
        try:
            data = read_yaml(path, "hardware profile")
        except YAMLFileError as error:
            raise ValueError(str(error)) from None
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{path}: not a pipesim hardware profile (format {PROFILE_FORMAT!r} expected)")
        try:
            return cls(model=data["model"],
                       nodes={k: NodeCoefficients(**v) for k, v in data["nodes"].items()},
                       links={k: LinkCoefficients(**v) for k, v in (data.get("links") or {}).items()},
                       verify_overhead=float(data.get("verify_overhead", 0.0)), meta=dict(data.get("meta") or {}),
                       poll=data.get("poll"))
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: malformed hardware profile ({error})") from None
