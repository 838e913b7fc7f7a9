"""A reference engine for tests: drives a strategy step by step with a pure-Python KV cache model.

It checks the scheduling core's KV-multibuffering protocol directly: every stage applies the KV operations and
runs in launch order, and each computed run must see exactly the context it was drafted on (every earlier
position once, with the right token). Cancelled runs are skipped or computed at random, returns and drafts are
interleaved at random, so the check covers orders a real pipeline can produce.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from pipesim.scheduling import (
    CancelRuns,
    EmitTokens,
    Finish,
    InvalidateRuns,
    KVOp,
    LaunchRun,
    RequestDraft,
    Run,
    Strategy,
)
from pipesim.world.acceptance import OracleDraft, SyntheticTokens


class KVCacheModel:
    """Cells of (position, token, set of sequence ids), with llama.cpp's cp/rm/keep semantics."""

    def __init__(self) -> None:
        self.cells: list[list] = []  # [position, token, seqs]

    def apply(self, op: KVOp) -> None:
        end = op.p1 if op.p1 is not None else 1 << 60
        for cell in self.cells:
            pos, _, seqs = cell
            if op.kind == "cp" and op.seq in seqs and op.p0 <= pos < end:
                seqs.add(op.dst)
            elif op.kind == "rm" and op.p0 <= pos < end:
                seqs.discard(op.seq)
            elif op.kind == "keep":
                seqs.intersection_update({op.seq})
        self.cells = [c for c in self.cells if c[2]]

    def visible(self, seq_ids: tuple[int, ...], position: int) -> list[tuple[int, int]]:
        return sorted((c[0], c[1]) for c in self.cells if c[0] < position and c[2] & set(seq_ids))

    def write(self, run: Run) -> None:
        for token, position in zip(run.tokens, run.positions, strict=True):
            self.cells.append([position, token, set(run.seq_ids)])


@dataclass
class DriveResult:
    output: list[int]
    truth: list[int]
    launched: int
    cancelled: int
    checked_contexts: int
    max_cells: int


def drive(strategy: Strategy, tokens: SyntheticTokens, draft: OracleDraft, rng: random.Random,
          max_steps: int = 2_000_000) -> DriveResult:
    """Run ``strategy`` to completion against the synthetic target, checking every run's KV context."""
    kv = KVCacheModel()
    pipeline: deque[tuple[Run, tuple[int, ...]]] = deque()  # launched runs with the context they expect
    cancelled: set[int] = set()
    draft_request: RequestDraft | None = None
    early_exits: deque[tuple[int, int]] = deque()  # SPEED: (run id, early prediction) not yet delivered
    launched = n_cancelled = checked = max_cells = 0
    output: list[int] = []
    finished = False

    def execute(actions) -> None:
        nonlocal draft_request, launched, n_cancelled, finished
        for action in actions:
            if isinstance(action, LaunchRun):
                run = action.run
                context = tuple(strategy.sequence) + tuple(getattr(strategy, "_drafted", ()))
                pipeline.append((run, context[: run.first_position]))
                launched += 1
                if "exit_layer" in run.meta:
                    position = run.last_position + 1
                    right = draft.acceptance.correct(position, 0)
                    early_exits.append((run.run_id, tokens.token(position) if right else tokens.wrong(position)))
            elif isinstance(action, RequestDraft):
                draft_request = action
            elif isinstance(action, CancelRuns):
                cancelled.update(action.run_ids)
                n_cancelled += len(action.run_ids)
            elif isinstance(action, EmitTokens):
                output.extend(action.tokens)
            elif isinstance(action, Finish):
                finished = True
            else:
                assert isinstance(action, InvalidateRuns)

    execute(strategy.start())
    for _ in range(max_steps):
        if finished:
            break
        if early_exits and rng.random() < 0.6:  # an early exit arrives before its run completes
            run_id, token = early_exits.popleft()
            if any(r.run_id == run_id for r, _ in pipeline):
                execute(strategy.on_early_exit(run_id, token))
            continue
        do_draft = draft_request is not None and (not pipeline or rng.random() < 0.5)
        if do_draft:
            request, draft_request = draft_request, None
            proposal = draft.propose(len(request.context), request.n_tokens, request.committed_len)
            execute(strategy.on_draft(request.request_id, proposal))
            continue
        assert pipeline, "strategy stalled: nothing in flight and no draft requested"
        run, context = pipeline.popleft()
        for op in run.kv_ops:
            kv.apply(op)
        if run.run_id in cancelled:
            # A cancelled run is skipped, or computed anyway (the cancel came late). Its context may be broken
            # (an earlier run of its chain was skipped), so it is not checked; it writes only its own partition.
            if rng.random() < 0.3:
                kv.write(run)
                execute(strategy.on_logits(run.run_id, tokens.predictions(run.positions[run.output_from:])))
            continue
        expected = list(enumerate(context)) + list(zip(run.positions, run.tokens, strict=True))
        for i, position in enumerate(run.positions):
            seen = kv.visible(run.seq_ids, position) + [
                (p, t) for p, t in zip(run.positions[:i], run.tokens[:i], strict=True)]
            assert sorted(seen) == expected[:position], (
                f"run {run.run_id} token at {position} sees {sorted(seen)[-5:]} not {expected[:position][-5:]}")
            checked += 1
        kv.write(run)
        max_cells = max(max_cells, len(kv.cells))
        predictions = tokens.predictions(run.positions[run.output_from:])
        execute(strategy.on_logits(run.run_id, predictions))
    assert finished, "strategy did not finish"
    truth = [tokens.token(p) for p in range(strategy.prompt_len, strategy.prompt_len + len(output))]
    return DriveResult(output, truth, launched, n_cancelled, checked, max_cells)


def drive_chain(levels, tokens: SyntheticTokens, accuracies: list[float], seed: int, rng: random.Random,
                max_steps: int = 500_000):
    """Run a PipeSpec chain with random message and completion orders; check every level's KV contexts.

    Level i predicts the true token where a per-position uniform is below ``accuracies[i]`` (the target: 1.0),
    otherwise the same wrong token as every other wrong level (so two wrong levels agree, as related models do).
    """
    import numpy as np

    from pipesim.scheduling.strategies.pipespec import (
        CancelLevelRun,
        SendProgress,
        SendRollback,
        SendTokens,
        StartRound,
    )

    uniform = np.random.default_rng(seed).random(100_000)
    n_levels = len(levels)
    kvs = [KVCacheModel() for _ in levels]
    in_flight: dict[int, tuple[Run, tuple[int, ...]]] = {}
    cancelled: set[int] = set()
    links: dict[tuple[int, int], deque] = {}
    output: list[int] = []
    finished = False
    stats = {"runs": 0, "cancelled": 0, "rollbacks": 0}

    def predict(level: int, position: int) -> int:
        right = level == n_levels - 1 or uniform[position] < accuracies[level]
        return tokens.token(position) if right else tokens.wrong(position)

    def execute(level: int, actions) -> None:
        nonlocal finished
        for action in actions:
            if isinstance(action, LaunchRun):
                run = action.run
                in_flight[level] = (run, tuple(levels[level].out))
                stats["runs"] += 1
            elif isinstance(action, SendTokens | SendRollback | SendProgress | StartRound):
                stats["rollbacks"] += isinstance(action, SendRollback)
                links.setdefault((level, action.to_level), deque()).append(action)
            elif isinstance(action, CancelLevelRun):
                cancelled.add(action.run_id)
                stats["cancelled"] += 1
            elif isinstance(action, EmitTokens):
                output.extend(action.tokens)
            elif isinstance(action, Finish):
                finished = True

    for i, level in enumerate(levels):
        execute(i, level.start())
    for _ in range(max_steps):
        if finished:
            break
        busy_links = [key for key, queue in links.items() if queue]
        if busy_links and (not in_flight or rng.random() < 0.5):
            src, dst = rng.choice(busy_links)
            execute(dst, levels[dst].on_message(links[(src, dst)].popleft()))
            continue
        assert in_flight, "chain stalled: no run in flight and no message under way"
        level = rng.choice(sorted(in_flight))
        run, context = in_flight.pop(level)
        kv = kvs[level]
        for op in run.kv_ops:
            kv.apply(op)
        if run.run_id in cancelled and rng.random() < 0.7:
            execute(level, levels[level].on_result(run.run_id, ()))
            continue
        if run.run_id not in cancelled:
            expected = list(enumerate(context[: run.first_position])) + list(
                zip(run.positions, run.tokens, strict=True))
            for i, position in enumerate(run.positions):
                seen = kv.visible(run.seq_ids, position) + list(zip(run.positions[:i], run.tokens[:i], strict=True))
                assert sorted(seen) == expected[:position], (
                    f"level {level} run {run.run_id} at {position}: {sorted(set(seen) ^ set(expected[:position]))}")
        kv.write(run)
        predictions = [predict(level, p + 1) for p in run.positions[run.output_from:]]
        execute(level, levels[level].on_result(run.run_id, predictions))
    assert finished, "chain did not finish"
    prompt_len = levels[-1].prompt_len
    truth = [tokens.token(p) for p in range(prompt_len, prompt_len + len(output))]
    return output, truth, stats
