"""PipeInfer (Butler et al., SC'24): asynchronous pipelined speculation with early inference cancellation.

While the head waits for predictions it keeps drafting small micro-batches of tokens and launching them as
speculative runs, each chained on the previous run's last drafted token, next to a single-token
non-speculative run of each newly committed token. Every speculative run owns a KV partition (a sequence id)
from a bounded FIFO pool; it first copies its predecessor's sequence into its partition (``cp``), so its
tokens attend to the whole speculative chain. Once verified, accepted tokens are copied into the canonical
sequence and the partition is removed and returned to the pool. A mismatch invalidates every later run of the
chain; with early cancellation these runs are cancelled, and stages skip or abort them.

KV operations travel with the next launched run, so every stage applies them in the same order relative to
the runs around them.

Variants (``strategy.variant``; each departure is a switch of its own, ``PIPEINFER_VARIANT_SWITCHES``):

- ``reference`` follows AutonomicPerfectionist/PipeInfer ``examples/speculative/speculative.cpp`` (``main``'s head
  loop, ``run_speculation_loop``, ``start_async_spec_run``, ``begin_non_spec_run``, ``check_for_cancel``): after
  every verification that commits tokens the head launches a single-token non-speculative run of the last
  committed token and restarts speculation from the committed point, while in-flight runs whose drafted tokens
  are still consistent survive (and commit when their turn comes); the prompt is processed before any
  speculation; every ``llama_kv_cache_seq_rm``/``seq_cp`` the code issues on the target context is counted as a
  relayed transaction on the run it precedes (``Run.kv_transactions``); drafting stops below
  ``p_accept + p_adjust`` (``calc_p_adjust``).
- ``continuous`` keeps one speculative chain going, launches a single-token run only when it breaks, speculates
  during the prefill and carries its few KV operations in the next run's header at no cost.

Token trees (``n_parallel > 1``, both variants): the draft proposes a tree of up to ``n_parallel`` branches, split
above ``p_split + p_adjust`` (``start_async_spec_run``); a speculative run carries every node of the tree as one
batch, each node with the sequence ids of the branches whose path holds it (partition ``k`` owns sequence ids
``(k-1) * n_parallel + 1 ...``, the code's ``seq_offset``); the next run continues branch 0 (the code's
``id = drafts[0].tokens.back()``) and copies its sequence into each of its own; verification walks the tree
(``verify_tree``) and copies the kept branch's accepted cells to sequence 0 (``s_keep``). A run is judged consistent
by branch 0's path, as ``check_for_cancel`` ends with branch 0's verdict.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ..actions import Action, CancelRuns, InvalidateRuns, LaunchRun, RequestDraft
from ..kv_pool import KVPartitionPool
from ..prefix import GrowingPrefix
from ..runs import CANONICAL_SEQ, KVOp, Run
from ..verification import TokenTree, verify_tree
from .base import Strategy

# Defaults of the paper's code and scripts: --draft 3, -pa 0.1 (p_accept), 1000 sequence partitions; the code's
# n_parallel 1 and p_split 0.1 (common.h; the paper's script sets -np 3 -ps 0.9)
DEFAULT_MICRO_BATCH = 3
DEFAULT_MIN_CONFIDENCE = 0.1
DEFAULT_PARTITIONS = 1000
DEFAULT_N_PARALLEL = 1
DEFAULT_P_SPLIT = 0.1
# each split of a token tree removes and copies the new branch's sequence on the draft's own context
# (start_async_spec_run: llama_kv_cache_seq_rm + llama_kv_cache_seq_cp on ctx_dft), not relayed to the stages
DRAFT_SPLIT_TRANSACTIONS = 2

# Each variant's setting of every switch (an explicit switch overrides its variant's).
PIPEINFER_VARIANT_SWITCHES: dict[str, dict[str, object]] = {
    "reference": {"run_pattern": "reference", "head_priority": "run", "sync_prefill": True,
                  "cancelled_traffic": "full", "kv_transactions": "reference"},
    "continuous": {"run_pattern": "continuous", "head_priority": "step", "sync_prefill": False,
                   "cancelled_traffic": "header", "kv_transactions": "compact"},
}


def resolve_switches(variant: str = "reference", **given: object) -> dict[str, object]:
    """Every switch's setting: the variant's, overridden by each one ``given`` (not None)."""
    if variant not in PIPEINFER_VARIANT_SWITCHES:
        raise ValueError(f"variant must be one of {', '.join(PIPEINFER_VARIANT_SWITCHES)}, got {variant!r}")
    switches = dict(PIPEINFER_VARIANT_SWITCHES[variant])
    switches.update({key: value for key, value in given.items() if key in switches and value is not None})
    return switches


def reference_kv_transactions(n_partitions: int, n_parallel: int = 1) -> dict[str, int]:
    """Relayed KV transactions on the target context that ``speculative.cpp`` issues, by occasion.

    ``max_seq = n_simul_seqs * n_seq_dft + 1`` sequence ids (``main``). ``spec_launch``: ``start_async_spec_run``
    removes and copies each of its ``n_parallel`` sequences (2 each) and ``begin_async_run`` removes them at the
    run's position (1 each). ``verify``: after a speculative run commits tokens, ``main`` removes the tail of its
    ``n_parallel`` sequences, removes and copies the kept range of sequence 0 (2), and removes and copies that
    range for every sequence 1..max_seq (2 each). ``nonspec_before``: ``begin_async_run`` for a non-speculative
    run removes every sequence 0..max_seq at its position; ``nonspec_after``: then copies sequence 0 to every
    sequence 1..max_seq (these travel ahead of the next run). A tree's splits are on the draft's own context and
    not relayed (``DRAFT_SPLIT_TRANSACTIONS``).
    """
    max_seq = n_partitions * n_parallel + 1
    return {"spec_launch": 3 * n_parallel, "verify": n_parallel + 2 + 2 * max_seq,
            "nonspec_before": max_seq + 1, "nonspec_after": max_seq}


def reference_kv_transaction_ops(occasion: str, where: tuple[int, ...], n_partitions: int,
                                 n_parallel: int = 1) -> list[KVOp]:
    """The transactions ``reference_kv_transactions`` counts, as operations: ``len`` equals its count for
    ``occasion``. ``where`` (pipesim positions) is what the occasion's loops in ``speculative.cpp`` read:

    - ``spec_launch`` ``(offset, source, from, first)``: ``start_async_spec_run`` removes each sequence
      ``offset + i`` from ``from`` on and copies ``source`` over ``[from, first)`` into it; ``begin_async_run``
      removes it at the run's first position ``first``;
    - ``verify`` ``(offset, first, end[, keep])`` (``end``: the position of the token the next run feeds, the code's
      ``n_past_tgt``; ``first``: the run's first drafted position, the code's ``current_run.n_past_tgt + 1``;
      ``keep``: the kept branch's sequence, the code's ``s_keep + seq_offset``, ``offset`` when not given):
      ``main`` removes each ``offset + i`` from ``end`` on, replaces sequence 0 over ``[first, end)`` by the kept
      sequence and mirrors that range into every sequence ``1..max_seq``;
    - ``nonspec_before`` / ``nonspec_after`` ``(q,)``: ``begin_async_run`` removes every sequence ``0..max_seq`` at
      ``q``, then copies sequence 0 there to every ``1..max_seq``.

    ``offset`` is the run's partition's first sequence id (the code's ``seq_offset``; the strategy's ``_seqs``);
    ``max_seq = n_partitions * n_parallel + 1``, one id past the last partition's (the code's loops touch it, so a
    KV cache needs ``max_seq + 1`` ids).
    """
    max_seq = n_partitions * n_parallel + 1
    if occasion == "spec_launch":
        offset, source, start, first = where
        ops: list[KVOp] = []
        for i in range(n_parallel):
            ops += [KVOp("rm", offset + i, p0=start, p1=None), KVOp("cp", source, offset + i, start, first)]
        return ops + [KVOp("rm", offset + i, p0=first, p1=first + 1) for i in range(n_parallel)]
    if occasion == "verify":
        offset, first, end, keep = (*where, where[0]) if len(where) == 3 else where
        ops = [KVOp("rm", offset + i, p0=end, p1=None) for i in range(n_parallel)]
        ops += [KVOp("rm", CANONICAL_SEQ, p0=first, p1=end), KVOp("cp", keep, CANONICAL_SEQ, first, end)]
        for seq in range(1, max_seq + 1):
            ops += [KVOp("rm", seq, p0=first, p1=end), KVOp("cp", CANONICAL_SEQ, seq, first, end)]
        return ops
    (q,) = where
    if occasion == "nonspec_before":
        return [KVOp("rm", seq, p0=q, p1=q + 1) for seq in range(max_seq + 1)]
    if occasion == "nonspec_after":
        return [KVOp("cp", CANONICAL_SEQ, seq, q, q + 1) for seq in range(1, max_seq + 1)]
    raise ValueError(f"unknown KV transaction occasion {occasion!r}")


@dataclass
class _ChainLink:
    run: Run
    predictions: list[int] | None = None
    burst_start: int = 0  # reference run pattern: first position of the drafted tokens the run builds on
    assumed: tuple[int, ...] = ()  # ... and those tokens, through the run's own (empty: a non-speculative run)


class PipeInferStrategy(Strategy):
    """Continuous asynchronous speculation with early cancellation and KV multibuffering.

    Parameters: ``micro_batch`` drafted tokens per speculative run (1-4 in the paper), ``min_confidence`` the
    draft-probability cut-off below which drafting stops, ``max_runs_in_flight`` a bound on valid runs in the
    pipeline (None: bounded by the partition pool only, as in the paper's code), ``n_partitions`` the size of
    the KV partition pool, ``early_cancellation`` whether invalidated runs are cancelled, ``n_parallel`` the most
    branches of a drafted token tree (1: a linear draft) and ``p_split`` its split threshold. With ``kv_capacity``
    (set by the engine from the stages' KV caches) no speculation starts that would not fit them: the head waits
    for verifications to free partitions instead (back-pressure).
    """

    name = "pipeinfer"

    def __init__(self, prompt: Sequence[int], n_generate: int, micro_batch: int = DEFAULT_MICRO_BATCH,
                 min_confidence: float = DEFAULT_MIN_CONFIDENCE, max_runs_in_flight: int | None = None,
                 n_partitions: int = DEFAULT_PARTITIONS, early_cancellation: bool = True,
                 stop_tokens: Sequence[int] = (), variant: str = "reference", run_pattern: str | None = None,
                 head_priority: str | None = None, sync_prefill: bool | None = None,
                 cancelled_traffic: str | None = None, kv_transactions: str | None = None,
                 p_recovery: float = 0.0, p_decay: float = 0.0, n_parallel: int = DEFAULT_N_PARALLEL,
                 p_split: float = DEFAULT_P_SPLIT) -> None:
        super().__init__(prompt, n_generate, stop_tokens)
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        if n_parallel < 1:
            raise ValueError(f"n_parallel must be >= 1, got {n_parallel}")
        if max_runs_in_flight is not None and max_runs_in_flight < 1:
            raise ValueError(f"max_runs_in_flight must be >= 1 or None, got {max_runs_in_flight}")
        switches = resolve_switches(variant, run_pattern=run_pattern, head_priority=head_priority,
                                    sync_prefill=sync_prefill, cancelled_traffic=cancelled_traffic,
                                    kv_transactions=kv_transactions)
        self.variant = variant
        self.run_pattern: str = switches["run_pattern"]
        self.head_priority: str = switches["head_priority"]  # read by the driver
        self.sync_prefill: bool = switches["sync_prefill"]
        self.cancelled_traffic: str = switches["cancelled_traffic"]  # read by the engines' stages
        self.kv_transactions: str = switches["kv_transactions"]
        self.micro_batch = micro_batch
        self.min_confidence = min_confidence  # p_accept
        self.p_recovery = p_recovery
        self.p_decay = p_decay
        self.n_parallel = n_parallel
        self.p_split = p_split
        # a tree holds at most micro_batch nodes before its last step, which adds one per branch
        self._max_nodes = micro_batch + (n_parallel if n_parallel > 1 else 0)
        self.draft_kv_transactions = 0  # seq_rm/seq_cp on the draft's own context for the trees' splits
        self._iter = 0  # speculative runs launched since the head last handled predictions (calc_p_adjust's iter)
        self._n_reject = 0  # drafts that stopped before their first token since the last commit
        self._prefill_pending = self.sync_prefill
        self._tx = (reference_kv_transactions(n_partitions, n_parallel) if self.kv_transactions == "reference"
                    else None)
        self._pending_tx = 0
        self._pending_tx_where: list[tuple[str, tuple[int, ...]]] = []  # the occasions behind _pending_tx
        self.n_partitions = n_partitions
        self.max_runs_in_flight = max_runs_in_flight
        self.early_cancellation = early_cancellation
        self.pool = KVPartitionPool(n_partitions)
        self._chain: deque[_ChainLink] = deque()  # valid in-flight runs, in position order
        self._links: dict[int, _ChainLink] = {}
        self._drafted: deque[int] = deque()  # unverified drafted tokens at positions len(sequence)...
        self._draft_request: RequestDraft | None = None
        self._draft_epoch = 0
        self._epoch = 0  # bumped whenever the speculative continuation is thrown away
        self._draft_stalled = False
        self._spec_cells = 0  # KV cells the partitions of in-flight speculative runs hold (their own tokens)

    # -- events ------------------------------------------------------------------------------------
    def start(self) -> list[Action]:
        return [self._push(self._launch_prefill()), *self._speculate()]

    def on_logits(self, run_id: int, predictions: Sequence[int]) -> list[Action]:
        self._iter = 0  # the head left its speculation loop to handle predictions
        link = self._links.get(run_id)
        if link is None or self.done:  # an invalidated run finished anyway: nothing to learn from it
            return self._speculate()
        link.predictions = list(predictions)
        actions: list[Action] = []
        reference = self.run_pattern == "reference"
        if reference:  # check_for_cancel before the oldest run is taken (n_past_tgt counts the last token)
            actions.extend(self._check_for_cancel(len(self.sequence)))
        resolve = self._resolve_front_reference if reference else self._resolve_front
        while self._chain and self._chain[0].predictions is not None and not self.done:
            actions.extend(resolve())
            self._draft_stalled = False
        actions.extend(self._speculate())
        return actions

    def on_draft(self, request_id: int, tokens: Sequence[int]) -> list[Action]:
        request, self._draft_request = self._draft_request, None
        if self.done or request is None or request.request_id != request_id:
            return []
        stale = self._draft_epoch != self._epoch or len(request.context) != len(self.sequence) + len(self._drafted)
        if stale:
            return self._speculate()
        if not tokens:  # the draft was not confident enough
            self._n_reject += 1  # start_async_spec_run: n_reject++, and the loop starts again (iter 0)
            self._iter = 0
            if self.p_decay > 0:  # the threshold has fallen: the head drafts again at once
                return self._speculate()
            self._draft_stalled = True  # the same threshold again: wait for the next verification
            return []
        if isinstance(tokens, TokenTree):
            self.draft_kv_transactions += DRAFT_SPLIT_TRANSACTIONS * (tokens.n_branches - 1)
        return [*self._launch_speculative(tokens), *self._speculate()]

    def relayed_kv_ops(self, run: Run) -> tuple[KVOp, ...]:
        """The transactions counted ahead of ``run`` (the occasions recorded in ``run.meta["kv_tx"]``), in the order
        the reference issues them (``reference_kv_transaction_ops``)."""
        return tuple(op for occasion, where in run.meta.get("kv_tx", ())
                     for op in reference_kv_transaction_ops(occasion, where, self.n_partitions, self.n_parallel))

    def wants_draft(self, request_id: int) -> bool:
        request = self._draft_request
        return (not self.done and request is not None and request.request_id == request_id
                and self._draft_epoch == self._epoch)

    def draft_threshold(self) -> float:
        """The draft's stop threshold ``p_accept + p_adjust`` (``speculative.cpp``: ``calc_p_adjust``)."""
        return self.min_confidence + self._p_adjust()

    def _p_adjust(self) -> float:
        return self._iter * self.p_recovery - max(self._n_reject * self.p_decay, 0.0)

    def _seqs(self, partition: int) -> tuple[int, ...]:
        """The sequence ids partition ``partition`` owns: ``seq_offset = (k-1) * n_parallel + 1`` and the
        ``n_parallel`` after it (``main``'s free offsets); partition k itself with a linear draft."""
        base = (partition - 1) * self.n_parallel + 1
        return tuple(range(base, base + self.n_parallel))

    # -- internals ---------------------------------------------------------------------------------
    def _launch(self, *args, **kwargs):
        """A run, carrying the KV transactions counted since the previous launch (reference KV bookkeeping)."""
        launch = super()._launch(*args, **kwargs)
        if self._pending_tx:
            launch.run.kv_transactions = self._pending_tx
            launch.run.meta["kv_tx"] = tuple(self._pending_tx_where)  # reference_kv_transaction_ops expands them
            self._pending_tx = 0
            self._pending_tx_where = []
        return launch

    def _count_tx(self, occasion: str, where: tuple[int, ...]) -> None:
        if self._tx is not None:
            self._pending_tx += self._tx[occasion]
            self._pending_tx_where.append((occasion, where))

    def _launch_nonspec(self) -> LaunchRun:
        """A single-token non-speculative run of the last committed token (``begin_non_spec_run``)."""
        q = len(self.sequence) - 1
        self._count_tx("nonspec_before", (q,))
        launch = self._push(self._launch([self.sequence[-1]], q))
        self._count_tx("nonspec_after", (q,))
        return launch

    def _launch_speculative(self, tokens: Sequence[int]) -> list[Action]:
        """Launch drafted tokens as a speculative run chained on the chain's last run, in a fresh partition."""
        partition = self.pool.acquire()
        if partition is None:
            return []
        previous = self._chain[-1].run
        source = self._seqs(previous.partition)[0] if previous.speculative else CANONICAL_SEQ
        for seq in self._seqs(partition):  # start_async_spec_run copies into each of the partition's sequences
            self._queue_kv(KVOp("cp", source, dst=seq))
        first = len(self.sequence) + len(self._drafted)
        self._count_tx("spec_launch", (self._seqs(partition)[0], source,
                                       len(self.sequence) if source == CANONICAL_SEQ else first - 1, first))
        if isinstance(tokens, TokenTree) and tokens.n_branches == 1:
            tokens = list(tokens)
        if isinstance(tokens, TokenTree):
            launch, main = self._launch_tree(tokens, first, partition, previous.run_id)
        else:
            main = list(tokens)
            launch = self._launch(main, first, seq_ids=self._seqs(partition)[:1], speculative=True,
                                  parent=previous.run_id, partition=partition, kind="spec")
        self._drafted.extend(main)
        self._spec_cells += len(tokens)
        self._iter += 1
        if self.run_pattern == "reference":
            return [self._push(launch, len(self.sequence), tuple(self._drafted))]
        return [self._push(launch)]

    def _launch_tree(self, tree: TokenTree, first: int, partition: int, parent: int) -> tuple[LaunchRun, list[int]]:
        """A speculative run of a whole token tree, and the tokens of its branch 0 (the path the next run continues).

        Its nodes travel in drafting order (by depth, as ``start_async_spec_run`` adds them to ``batch_tgt``), each
        at position ``first + depth`` with the sequence ids of the branches holding it (``run.meta["token_seqs"]``;
        ``run.meta["tree_parents"]``: each node's parent in the run, -1 the context's last token).
        """
        depths = [tree.depth(i) for i in range(len(tree))]
        order = sorted(range(len(tree)), key=depths.__getitem__)
        index = {old: new for new, old in enumerate(order)}
        seqs = self._seqs(partition)
        token_seqs = tuple(tuple(seqs[b] for b in tree.branches[i]) for i in order)
        launch = self._launch([tree[i] for i in order], first, seq_ids=tuple(sorted(set().union(*token_seqs))),
                              speculative=True, parent=parent, partition=partition, kind="spec")
        run = launch.run
        run.positions = [first + depths[i] for i in order]
        run.meta["tree_parents"] = tuple(index[tree.parents[i]] if tree.parents[i] >= 0 else -1 for i in order)
        run.meta["token_seqs"] = token_seqs
        main = [tree[i] for i in tree.path(0)]
        run.meta["main_end"] = first + len(main)
        return launch, main

    def _walk_tree(self, run: Run, predictions: Sequence[int], q: int):
        """Verify a tree run from its branch-0 node at position ``q`` (whose path is committed): (new tokens,
        checked, accepted, the kept sequence, the verification), or None when ``q`` is not on branch 0's path."""
        main_seq = self._seqs(run.partition)[0]
        token_seqs = run.meta["token_seqs"]
        main = [i for i, seqs in enumerate(token_seqs) if main_seq in seqs]
        offset = q - run.first_position
        if not 0 <= offset < len(main):
            return None
        result = verify_tree(run.tokens, run.meta["tree_parents"], list(predictions), start=main[offset])
        keep_seq = min(token_seqs[result.end])  # s_keep = keeps[0]: the lowest branch that agreed throughout
        return result.emitted, result.n_checked, result.n_accepted, keep_seq, result, main

    def _push(self, launch, burst_start: int = 0, assumed: tuple[int, ...] = ()):
        link = _ChainLink(launch.run, None, burst_start, assumed)
        self._chain.append(link)
        self._links[launch.run.run_id] = link
        return launch

    def _speculate(self) -> list[Action]:
        """Ask for the next micro-batch of drafted tokens if the head may speculate now."""
        if self.done or self._draft_request is not None or self._draft_stalled or not self._chain:
            return []
        if self._prefill_pending:  # the prompt is processed before any speculation
            return []
        if self.max_runs_in_flight is not None and len(self._chain) >= self.max_runs_in_flight:
            return []
        if self.pool.n_free == 0 or not self._fits(self._max_nodes):
            return []
        threshold = self.draft_threshold()
        if threshold >= 1.0:  # run_speculation_loop: no speculation while p_accept + p_adjust >= 1
            return []
        context = GrowingPrefix(self.sequence, len(self.sequence), tuple(self._drafted))  # no O(tokens) copy
        self._draft_request = RequestDraft(self._new_request_id(), context, self.micro_batch, len(self.sequence),
                                           threshold, self.n_parallel, self.p_split + self._p_adjust())
        self._draft_epoch = self._epoch
        return [self._draft_request]

    def _fits(self, n_tokens: int) -> bool:
        """Back-pressure: ``n_tokens`` more speculative tokens fit every stage's KV cache (its committed cells,
        the cell of the next token, the cells of the partitions in flight: partitions released meanwhile are
        removed by operations that travel ahead of the next run)."""
        if self.kv_capacity is None:
            return True
        return len(self.sequence) + 1 + self._spec_cells + n_tokens <= self.kv_capacity

    def _resolve_front_reference(self) -> list[Action]:
        """The reference's verification of the oldest in-flight run (``speculative.cpp``, ``main``).

        The run decides the next token if it holds the position of the last committed token (the code's
        ``current_run.n_past_tgt + i_dft == n_past_tgt - 1``); its own drafted tokens are accepted while they
        equal the predictions. Then ``check_for_cancel`` drops runs that are stale or drafted on a token that
        lost, the run's partition is folded into sequence 0, a single-token run of the last committed token is
        launched, and speculation restarts from the committed point. A run that decides nothing is dropped.
        """
        self._prefill_pending = False
        link = self._chain.popleft()
        del self._links[link.run.run_id]
        run = link.run
        outputs = dict(zip(run.positions[run.output_from:], link.predictions or [], strict=False))
        q = len(self.sequence) - 1
        tree = self._walk_tree(run, link.predictions or [], q) if "tree_parents" in run.meta else None
        if q not in outputs or (tree is None and "tree_parents" in run.meta):  # decides a position already decided
            if run.speculative:
                self._free_partition(run)
            return []
        keep_seq = self._seqs(run.partition)[0] if run.speculative else CANONICAL_SEQ
        if tree is not None:  # the walk of speculative.cpp's verification loop over the tree's branches
            new_tokens, checked, accepted, keep_seq = tree[:4]
            predicted, p = new_tokens[-1], q + accepted
        else:
            new_tokens = []
            checked = accepted = 0
            p = q
            while True:
                predicted = outputs[p]
                new_tokens.append(predicted)
                if p + 1 > run.last_position:
                    break
                checked += 1
                if run.tokens[p + 1 - run.first_position] != predicted:
                    break
                accepted += 1
                p += 1
        last = p + 1  # position of the last new token; a surviving run drafted there is checked by it
        drafted_there = [other.assumed[last - other.burst_start] for other in self._chain
                         if other.assumed and other.burst_start <= last < other.burst_start + len(other.assumed)]
        if drafted_there:
            checked += 1
            accepted += predicted in drafted_there
        if run.speculative:  # its tokens after q join sequence 0 (q itself came with the run that committed it)
            if p > q:
                self._queue_kv(KVOp("cp", keep_seq, dst=CANONICAL_SEQ, p0=q + 1, p1=p + 1))
            self._free_partition(run)
            self._count_tx("verify", (self._seqs(run.partition)[0], run.first_position,
                                      len(self.sequence) + len(new_tokens) - 1, keep_seq))
        actions = self._commit(new_tokens, checked, accepted)
        self._n_reject = 0
        if self.done:
            actions.extend(self._invalidate_chain())
            return actions
        actions.extend(self._check_for_cancel(len(self.sequence) - 1))
        self._epoch += 1  # speculation restarts from the committed point
        self._drafted.clear()
        # begin_async_run (non-speculative) first removes every sequence's cell at the run's position: a
        # surviving run's partition (and the partitions copied from it) hold their own cell there
        q = len(self.sequence) - 1
        for partition in self.pool.in_use:
            for seq in self._seqs(partition):
                self._queue_kv(KVOp("rm", seq, p0=q, p1=q + 1))
        actions.append(self._launch_nonspec())
        return actions

    def _check_for_cancel(self, n_past: int) -> list[Action]:
        """``check_for_cancel``: a run ending before ``n_past`` (``n_past_max < n_past_tgt``) or drafted on a
        token the committed sequence contradicts is invalid; speculative ones are cancelled (the code only
        marks non-speculative ones, which go on and whose results are then ignored). A run chained on a
        cancelled one is cancelled too: its partition copy would miss the cancelled run's tokens (the code keeps
        it, relying on every sequence mirroring sequence 0; here partitions copy whole sequences)."""
        sequence = self.sequence
        n = len(sequence)
        invalid = []
        dropped: set[int] = set()  # cancelled speculative runs: a run chained on one lacks its context
        for link in self._chain:
            start, assumed, run = link.burst_start, link.assumed, link.run
            stale = run.meta.get("main_end", run.last_position + 1) < n_past  # n_past_max: branch 0's end
            if (stale or run.parent in dropped
                    or any(assumed[i] != sequence[start + i] for i in range(min(len(assumed), n - start)))):
                invalid.append(link)
                if run.speculative:
                    dropped.add(run.run_id)
        if not invalid:
            return []
        for link in invalid:
            self._chain.remove(link)
            del self._links[link.run.run_id]
            if link.run.speculative:
                self._free_partition(link.run)
        actions: list[Action] = [InvalidateRuns(tuple(link.run.run_id for link in invalid))]
        cancelled = tuple(link.run.run_id for link in invalid if link.run.speculative)
        if self.early_cancellation and cancelled:
            actions.append(CancelRuns(cancelled))
        return actions

    def _free_partition(self, run: Run) -> None:
        for seq in self._seqs(run.partition):
            self._queue_kv(KVOp("rm", seq))
        self.pool.release(run.partition)
        self._spec_cells -= run.n_tokens

    def _resolve_front(self) -> list[Action]:
        """Verify the oldest in-flight run against its predictions and commit what it decides."""
        self._prefill_pending = False
        link = self._chain.popleft()
        del self._links[link.run.run_id]
        run = link.run
        if "tree_parents" in run.meta:
            return self._resolve_front_tree(run, link.predictions or [])
        new_tokens: list[int] = []
        checked = accepted = 0
        chain_broken = False
        for position, predicted in zip(run.positions[run.output_from:], link.predictions or [], strict=False):
            if position + 1 != len(self.sequence) + len(new_tokens):
                continue  # this prediction decides a position already decided
            new_tokens.append(predicted)
            if not self._drafted:  # end of the speculative chain: the prediction is a bonus token
                chain_broken = True
                break
            checked += 1
            if self._drafted.popleft() != predicted:  # mismatch: the prediction is the correction
                chain_broken = True
                break
            accepted += 1
        if run.speculative:  # its drafted tokens before len(sequence) + accepted are committed
            self._retire_partition(run, len(self.sequence) + accepted)
            self._count_tx("verify", (self._seqs(run.partition)[0], run.first_position,
                                      len(self.sequence) + len(new_tokens) - 1))
        return self._go_on(new_tokens, checked, accepted, chain_broken)

    def _resolve_front_tree(self, run: Run, predictions: Sequence[int]) -> list[Action]:
        """``_resolve_front`` for a tree run: walk the tree from its root on branch 0 (the token the run before it
        confirmed); the chain goes on only while the accepted path is branch 0's to its end, and the prediction
        after it is the next run's first token, as for a linear run."""
        tree = self._walk_tree(run, predictions, len(self.sequence) - 1)
        if tree is None:  # decides nothing
            self._retire_partition(run, len(self.sequence))
            self._count_tx("verify", (self._seqs(run.partition)[0], run.first_position, run.first_position))
            self._n_reject = 0
            return self._commit([], 0, 0)
        new_tokens, checked, accepted, keep_seq, result, main = tree
        committed_end = len(self.sequence) + accepted
        on_main = set(result.path) <= set(main)
        chain_broken = True
        if on_main:
            for _ in range(accepted):
                self._drafted.popleft()
            if result.end == main[-1] and self._drafted:  # the bonus token meets the next run's first token
                checked += 1
                if self._drafted.popleft() == new_tokens[-1]:
                    accepted += 1
                    chain_broken = False
        self._retire_partition(run, committed_end, keep_seq)
        self._count_tx("verify", (self._seqs(run.partition)[0], run.first_position,
                                  len(self.sequence) + len(new_tokens) - 1, keep_seq))
        return self._go_on(new_tokens, checked, accepted, chain_broken)

    def _go_on(self, new_tokens: list[int], checked: int, accepted: int, chain_broken: bool) -> list[Action]:
        """After the front run's verification (continuous variant): drop the broken chain, commit, and restart
        with a single-token run unless generation is done."""
        actions: list[Action] = []
        if chain_broken:
            actions.extend(self._invalidate_chain())
        actions.extend(self._commit(new_tokens, checked, accepted))
        self._n_reject = 0
        if self.done:
            actions.extend(self._invalidate_chain())
        elif chain_broken:
            actions.append(self._launch_nonspec())
        return actions

    def _retire_partition(self, run: Run, committed_end: int, keep_seq: int | None = None) -> None:
        """Copy a verified run's accepted tokens (positions < ``committed_end``) from its kept sequence (branch 0's
        by default) to the canonical sequence; free it."""
        assert run.partition is not None
        seqs = self._seqs(run.partition)
        last_committed = min(run.last_position + 1, committed_end)
        if last_committed > run.first_position:
            self._queue_kv(KVOp("cp", seqs[0] if keep_seq is None else keep_seq, dst=CANONICAL_SEQ,
                                p0=run.first_position, p1=last_committed))
        for seq in seqs:
            self._queue_kv(KVOp("rm", seq))
        self.pool.release(run.partition)
        self._spec_cells -= run.n_tokens

    def _invalidate_chain(self) -> list[Action]:
        """Throw away every in-flight run and drafted token: cancel the runs and free their partitions."""
        self._epoch += 1
        self._drafted.clear()
        if not self._chain:
            return []
        run_ids = tuple(link.run.run_id for link in self._chain)
        for link in self._chain:
            del self._links[link.run.run_id]
            if link.run.speculative:
                for seq in self._seqs(link.run.partition):
                    self._queue_kv(KVOp("rm", seq))
                self.pool.release(link.run.partition)
                self._spec_cells -= link.run.n_tokens
        self._chain.clear()
        actions: list[Action] = [InvalidateRuns(run_ids)]
        if self.early_cancellation:
            actions.append(CancelRuns(run_ids))
        return actions

    @property
    def runs_in_flight(self) -> int:
        return len(self._chain)
