"""What a strategy asks its engine to do. Engines (simulator, executor) carry these out with their own clock."""

from __future__ import annotations

from dataclasses import dataclass

from .runs import Run


@dataclass(frozen=True)
class LaunchRun:
    """Evaluate ``run`` through the target pipeline; its predictions come back as ``Strategy.on_logits``."""

    run: Run


@dataclass(frozen=True)
class CancelRuns:
    """Early cancellation: stages skip these runs if not started, abort them between layers if started."""

    run_ids: tuple[int, ...]


@dataclass(frozen=True)
class RequestDraft:
    """Draft up to ``n_tokens`` tokens continuing ``context``; the answer comes back as ``Strategy.on_draft``.

    Drafting stops early at a token whose draft confidence is below ``min_confidence`` (when the draft reports
    confidences). ``committed_len`` is how much of ``context`` is committed (the rest is itself speculative).
    With ``n_parallel > 1`` the draft proposes a token tree (a ``TokenTree``) of up to ``n_parallel`` branches, a
    branch splitting at each candidate whose draft probability exceeds ``split_confidence`` (PipeInfer).
    """

    request_id: int
    context: tuple[int, ...]
    n_tokens: int
    committed_len: int
    min_confidence: float = 0.0
    n_parallel: int = 1
    split_confidence: float = 1.0


@dataclass(frozen=True)
class EmitTokens:
    """Tokens committed to the output, with how many of them were drafted tokens accepted."""

    tokens: tuple[int, ...]
    n_drafted_checked: int = 0
    n_drafted_accepted: int = 0


@dataclass(frozen=True)
class InvalidateRuns:
    """Runs whose results are no longer wanted (for accounting of wasted work; CancelRuns also stops them)."""

    run_ids: tuple[int, ...]


@dataclass(frozen=True)
class Finish:
    """Generation is complete."""


Action = LaunchRun | CancelRuns | RequestDraft | EmitTokens | InvalidateRuns | Finish
