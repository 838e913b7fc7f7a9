"""A reference engine for tests: drives strategies through the shared ``HeadDriver`` with an exact KV cache model.

It checks the scheduling core's KV-multibuffering protocol directly: every stage applies the KV operations and
runs in launch order, and each computed run must see exactly the context it was drafted on (every earlier
position once, with the right token). The engine interprets no action itself: the driver does, through the port
below. Randomness chooses the event order a real pipeline can produce: whether the head takes its next work or
a run in the pipeline completes first, whether a cancelled run in the pipeline is skipped or completes anyway
(the cancel came late), when early exits and messages between the levels of a chain arrive.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from pipesim.scheduling import KVOp, LaunchRun, Run, Strategy
from pipesim.scheduling.driver import DRAFT, STAGE0, VERIFY, HeadDriver
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
        for token, position, seqs in zip(run.tokens, run.positions, token_seqs(run), strict=True):
            self.cells.append([position, token, set(seqs)])


def token_seqs(run: Run) -> list[tuple[int, ...]]:
    """Each token's sequence ids: a token tree's own per node (``run.meta["token_seqs"]``), else the run's."""
    return list(run.meta.get("token_seqs", [run.seq_ids] * run.n_tokens))


def token_ancestors(run: Run) -> list[list[int]]:
    """The tokens of the run each token attends to besides the cache: its tree ancestors, or every earlier one."""
    parents = run.meta.get("tree_parents")
    if parents is None:
        return [list(range(i)) for i in range(run.n_tokens)]
    out: list[list[int]] = []
    for i in range(run.n_tokens):
        chain, node = [], parents[i]
        while node >= 0:
            chain.append(node)
            node = parents[node]
        out.append(chain)
    return out


@dataclass
class DriveResult:
    output: list[int]
    truth: list[int]
    launched: int
    cancelled: int
    checked_contexts: int
    max_cells: int


@dataclass
class _DraftTask:
    request: object
    tokens: list[int]
    done: bool = True


class _Head(HeadDriver):
    """The driver of one pipeline, with the port of the reference engine (one FIFO stage holding the KV model)."""

    def __init__(self, engine: _Engine, strategy: Strategy, level: int) -> None:
        super().__init__(strategy, self, f"n{level}", 2, engine.records, level)
        self.engine = engine
        self.kv = KVCacheModel()
        self.pipeline: deque[tuple[Run, bool]] = deque()  # runs that left the head: (run, computed)
        self.contexts: dict[int, tuple[int, ...]] = {}  # the context each launched run expects
        self.stage_cancelled: set[int] = set()

    def execute(self, actions) -> None:
        actions = list(actions)
        for action in actions:
            if isinstance(action, LaunchRun):
                run = action.run
                context = tuple(self.strategy.sequence) + tuple(getattr(self.strategy, "_drafted", ()))
                self.contexts[run.run_id] = context[: run.first_position]
                self.engine.launched += 1
                if "exit_layer" in run.meta:
                    self.engine.early_exit_of(self, run)
        super().execute(actions)

    # -- the port --------------------------------------------------------------------------------------
    def now(self) -> float:
        return float(self.engine.steps)

    def drop(self, run: Run, send_header: bool) -> None:
        self.pipeline.append((run, False))  # one stage models them all: its KV operations apply in any case

    def send_cancel(self, run_ids: tuple[int, ...]) -> None:
        self.stage_cancelled.update(run_ids)
        self.engine.n_cancelled += len(run_ids)

    def send_to_level(self, message) -> None:
        self.engine.links.setdefault((self.level, message.to_level), deque()).append(message)
        self.engine.rollbacks += type(message).__name__ == "SendRollback"

    def begin_draft(self, request) -> _DraftTask:
        return _DraftTask(request, self.engine.draft.propose_request(request).tokens)

    def end_draft(self, task) -> None:
        pass

    def finish(self) -> None:
        self.engine.finished = True

    # -- the pipeline ----------------------------------------------------------------------------------
    def complete_next(self, rng: random.Random) -> None:
        """The oldest run in the pipeline reaches the stage: KV operations, then compute (or skip)."""
        run, computed = self.pipeline.popleft()
        kv = self.kv
        for op in run.kv_ops:
            kv.apply(op)
        if not computed:
            return
        if run.run_id in self.stage_cancelled:
            # A cancelled run is skipped, or computed anyway (the cancel came late). Its context may be broken
            # (an earlier run of its chain was skipped), so it is not checked; it writes only its own partition.
            if rng.random() < self.engine.p_late:
                kv.write(run)
                self.predictions_arrived(run.run_id, self.engine.predict(self, run), run.n_outputs)
            return
        context = self.contexts[run.run_id]
        seqs, ancestors = token_seqs(run), token_ancestors(run)
        for i, position in enumerate(run.positions):
            # a token sees the cells of its sequences and the batch's earlier tokens that share one (its path)
            seen = kv.visible(seqs[i], position) + [
                (run.positions[j], run.tokens[j]) for j in range(i) if set(seqs[j]) & set(seqs[i])]
            path = sorted((run.positions[j], run.tokens[j]) for j in ancestors[i])
            expected = list(enumerate(context))[:run.first_position] + path
            assert sorted(seen) == expected[:position], (
                f"level {self.level} run {run.run_id} token at {position} sees {sorted(seen)[-5:]} "
                f"not {expected[:position][-5:]}")
            self.engine.checked += 1
        kv.write(run)
        self.engine.max_cells = max(self.engine.max_cells, len(kv.cells))
        self.predictions_arrived(run.run_id, self.engine.predict(self, run), run.n_outputs)

    def head_step(self) -> bool:
        """The head takes its next work; False when it has none."""
        work = self.next_work()
        if work is None:
            return False
        kind, item = work
        now = self.now()
        if kind is VERIFY:
            self.verify(item, now)
        elif kind is STAGE0:
            self.pipeline.append((item, True))
            self.stage0_done(item, now)
        else:
            assert kind is DRAFT
            self.draft_step_done(item, now, 1)
        return True


class _Engine:
    def __init__(self, tokens: SyntheticTokens, draft: OracleDraft | None, accuracies: list[float],
                 uniform) -> None:
        self.tokens = tokens
        self.draft = draft
        self.accuracies = accuracies
        self.uniform = uniform
        self.records: list = []
        self.links: dict[tuple[int, int], deque] = {}
        self.early_exits: deque[tuple[_Head, int, int]] = deque()  # (head, run id, early prediction)
        self.finished = False
        self.steps = self.launched = self.n_cancelled = self.checked = self.max_cells = self.rollbacks = 0
        self.p_late = 0.3  # how often a cancelled run is computed anyway (its cancel came late)

    def predict(self, head: _Head, run: Run) -> list[int]:
        accuracy = self.accuracies[head.level]
        out = []
        for p in run.positions[run.output_from:]:
            right = accuracy >= 1.0 or self.uniform(p + 1) < accuracy
            out.append(self.tokens.token(p + 1) if right else self.tokens.wrong(p + 1))
        return out

    def early_exit_of(self, head: _Head, run: Run) -> None:
        position = run.last_position + 1
        right = self.draft.acceptance.correct(position, 0)
        token = self.tokens.token(position) if right else self.tokens.wrong(position)
        self.early_exits.append((head, run.run_id, token))

    def run(self, heads: list[_Head], rng: random.Random, max_steps: int) -> None:
        for head in heads:
            head.start()
        for _ in range(max_steps):
            if self.finished:
                return
            self.steps += 1
            if self.early_exits and rng.random() < 0.6:  # an early exit arrives before its run completes
                head, run_id, token = self.early_exits.popleft()
                in_flight = any(r.run_id == run_id for r in head.launch_queue) or any(
                    r.run_id == run_id for r, _ in head.pipeline)
                if in_flight:
                    head.early_exit_arrived(run_id, token)
                continue
            busy_links = [key for key, queue in self.links.items() if queue]
            if busy_links and rng.random() < 0.5:
                src, dst = rng.choice(busy_links)
                heads[dst].message_arrived(self.links[(src, dst)].popleft())
                continue
            head = rng.choice(heads)
            if head.pipeline and rng.random() < 0.5:
                head.complete_next(rng)
                continue
            if head.head_step():
                continue
            if head.pipeline:
                head.complete_next(rng)
                continue
            idle = not any(h.pipeline or h.results or h.launch_queue or h.draft_task or h.messages for h in heads)
            if idle and not any(self.links.values()) and not self.early_exits:
                raise AssertionError("strategy stalled: nothing in flight, nothing to launch or draft")
        assert self.finished, "strategy did not finish"


def drive(strategy: Strategy, tokens: SyntheticTokens, draft: OracleDraft, rng: random.Random,
          max_steps: int = 2_000_000, p_late: float = 0.3) -> DriveResult:
    """Run ``strategy`` to completion against the synthetic target, checking every run's KV context
    (``p_late``: how often a cancelled run in the pipeline is computed anyway)."""
    engine = _Engine(tokens, draft, [1.0], lambda p: 0.0)
    engine.p_late = p_late
    head = _Head(engine, strategy, 0)
    engine.run([head], rng, max_steps)
    output = head.output
    truth = [tokens.token(p) for p in range(strategy.prompt_len, strategy.prompt_len + len(output))]
    return DriveResult(output, truth, engine.launched, engine.n_cancelled, engine.checked, engine.max_cells)


def drive_chain(levels, tokens: SyntheticTokens, accuracies: list[float], seed: int, rng: random.Random,
                max_steps: int = 500_000):
    """Run a PipeSpec chain with random message and completion orders; check every level's KV contexts.

    Level i predicts the true token where a per-position uniform is below ``accuracies[i]`` (the target: 1.0),
    otherwise the same wrong token as every other wrong level (so two wrong levels agree, as related models do).
    """
    import numpy as np

    uniform = np.random.default_rng(seed).random(100_000)
    engine = _Engine(tokens, None, accuracies, lambda p: uniform[p])
    heads = [_Head(engine, level, i) for i, level in enumerate(levels)]
    engine.run(heads, rng, max_steps)
    output = heads[-1].output
    prompt_len = levels[-1].prompt_len
    truth = [tokens.token(p) for p in range(prompt_len, prompt_len + len(output))]
    stats = {"runs": engine.launched, "cancelled": sum(len(h.cancelled) for h in heads),
             "rollbacks": engine.rollbacks}
    return output, truth, stats
