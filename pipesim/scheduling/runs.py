"""Runs (batches of tokens sent through the target pipeline) and the KV operations ordered with them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CANONICAL_SEQ = 0  # sequence id of the committed (non-speculative) sequence

KVOpKind = Literal["cp", "rm", "keep"]


@dataclass(frozen=True)
class KVOp:
    """A KV-cache operation every stage applies, in order, before the run it travels with.

    ``cp``: add ``dst`` to cells of ``seq`` with ``p0 <= pos < p1``; ``rm``: remove ``seq`` from those cells;
    ``keep``: drop every sequence but ``seq``. ``p1=None`` means "to the end".
    """

    kind: KVOpKind
    seq: int
    dst: int = -1
    p0: int = 0
    p1: int | None = None


@dataclass
class Run:
    """A batch of tokens evaluated by the target pipeline in one pass.

    ``seq_ids`` are the KV sequences the run's tokens belong to (its partition); ``output_from`` is the index of
    the first token whose prediction the head needs (a prefill needs only the last one). ``kv_ops`` are applied
    on every stage before the run, even when the run itself is cancelled and skipped.
    """

    run_id: int
    tokens: list[int]
    positions: list[int]
    seq_ids: tuple[int, ...]
    speculative: bool
    parent: int | None = None
    output_from: int = 0
    kv_ops: tuple[KVOp, ...] = ()
    partition: int | None = None
    kind: str = "decode"  # "prefill" | "decode" | "verify" | "spec"
    meta: dict = field(default_factory=dict)
    kv_transactions: int = 0  # relayed KV transactions (seq_rm/seq_cp) every stage applies before this run

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_outputs(self) -> int:
        return len(self.tokens) - self.output_from

    @property
    def first_position(self) -> int:
        return self.positions[0]

    @property
    def last_position(self) -> int:
        return self.positions[-1]
