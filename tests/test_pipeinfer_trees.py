"""PipeInfer's token trees (``n_parallel``, ``p_split``): the oracle's trees, the runs that carry them, their KV.

Expected values come from hand-worked trees and from the reference code's loops (AutonomicPerfectionist/PipeInfer
``examples/speculative/speculative.cpp``: ``start_async_spec_run``'s split loop, ``main``'s verification and its
KV bookkeeping), or are properties any correct engine has (greedy output equals target-only decoding, each node
sees exactly its own path in the KV cache).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pipesim.scheduling import KVOp, LaunchRun, RequestDraft, TokenTree, make_strategy, verify_tree
from pipesim.scheduling.strategies.pipeinfer import reference_kv_transaction_ops, reference_kv_transactions
from pipesim.world.acceptance import AcceptanceModel, ConfidenceModel, OracleDraft, SyntheticTokens

from .kv_model import drive

PROMPT_LEN = 7
PAPER = Path(__file__).resolve().parent.parent / "scenarios" / "paper-8node-cpu.yaml"


def _oracle(alpha: float, seed: int, vocab: int = 97) -> OracleDraft:
    tokens = SyntheticTokens(vocab_size=vocab, seed=seed)
    return OracleDraft(tokens, AcceptanceModel("iid", alpha, prompt_len=PROMPT_LEN, seed=seed,
                                               confidence=ConfidenceModel()))


# -- verify_tree on hand-made trees ---------------------------------------------------------------------------
def test_verify_tree_keeps_the_longest_agreeing_path_across_branches():
    # context ... | depth 0: 5 (node 0) and 6 (node 1); depth 1: 7 under 5 (node 2), 8 under 6 (node 3);
    # depth 2: 9 under 8 (node 4). The target says 6 after the context, 8 after 6, 4 after 8: path 6, 8 and the
    # correction 4 (node 4 holds 9, not 4)
    tokens, parents = [5, 6, 7, 8, 9], [-1, -1, 0, 1, 3]
    predictions = [7, 8, 0, 4, 0]  # after each node's path
    result = verify_tree(tokens, parents, predictions, root_prediction=6)
    assert result.accepted == [6, 8] and result.next_token == 4
    assert result.path == [1, 3] and result.end == 3 and not result.at_leaf
    assert result.n_checked == 3  # the roots, node 1's child, node 3's child were compared


def test_verify_tree_from_a_committed_node_and_the_bonus_at_a_leaf():
    tokens, parents = [5, 6, 7, 8], [-1, -1, 0, 1]
    predictions = [7, 3, 2, 1]
    # node 0 (5) is already committed: the walk starts with its prediction 7, accepts node 2 (a leaf): bonus 2
    result = verify_tree(tokens, parents, predictions, start=0)
    assert result.accepted == [7] and result.next_token == 2 and result.at_leaf and result.n_checked == 1
    with pytest.raises(ValueError):
        verify_tree(tokens, parents, predictions, start=4)


# -- the oracle's trees ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(40))
def test_a_one_branch_tree_is_the_linear_proposal(seed):
    oracle = _oracle(0.6, seed)
    context = tuple(oracle.tokens.token(p) for p in range(20))
    for min_confidence in (0.0, 0.3, 0.7):
        linear = oracle.propose(context, 4, 17, min_confidence)
        tree = oracle.propose_tree(context, 4, 17, min_confidence, n_parallel=1, split_confidence=0.0)
        assert list(tree.tokens) == linear.tokens and tree.tokens.parents == tuple(range(-1, len(linear.tokens) - 1))
        assert tree.confidences == linear.confidences and tree.n_steps == linear.n_steps
        assert tree.n_splits == 0


def test_trees_follow_the_split_loop_and_at_most_one_child_agrees():
    n_draft, n_parallel = 3, 3
    seen_splits = 0
    for seed in range(300):
        oracle = _oracle(0.5, seed, vocab=32000)
        truth = oracle.tokens.token
        context = tuple(truth(p) for p in range(20))
        proposal = oracle.propose_tree(context, n_draft, 20, 0.1, n_parallel, 0.1)
        tree = proposal.tokens
        again = oracle.propose_tree(context, n_draft, 20, 0.1, n_parallel, 0.1)
        assert again == proposal  # seeded, deterministic
        assert tree.n_branches <= n_parallel and proposal.n_splits == tree.n_branches - 1
        # every step but the last leaves at most n_draft nodes, and the last adds one per branch at most
        assert len(tree) <= n_draft + n_parallel
        seen_splits += proposal.n_splits
        children: dict[int, list[int]] = {}
        for node, parent in enumerate(tree.parents):
            children.setdefault(parent, []).append(node)
        for parent, kids in children.items():
            assert len({tree[k] for k in kids}) == len(kids)  # distinct candidates
            on_path = parent < 0 or _on_target(tree, parent, truth, 20)
            right = [k for k in kids if tree[k] == truth(20 + tree.depth(k))]
            assert len(right) <= (1 if on_path else 0)
        assert tree.path(0) == list(range(len(tree.path(0))))  # branch 0's path comes first
    assert seen_splits > 100  # p_split 0.1 lets alternatives split often


def _on_target(tree: TokenTree, node: int, truth, start: int) -> bool:
    while node >= 0:
        if tree[node] != truth(start + tree.depth(node)):
            return False
        node = tree.parents[node]
    return True


def test_a_hand_worked_tree():
    # the split loop by hand: n_draft 2, two branches, every alternative above p_split=0. Step 0: branch 0 takes
    # its top candidate and splits branch 1 with candidate 1 (2 nodes, not > 2). Step 1: both branches sample, each
    # adds one node (3 > 2: the budget ends the tree after this step). 4 nodes: two roots, one child each.
    oracle = _oracle(0.5, 3, vocab=32000)
    context = tuple(oracle.tokens.token(p) for p in range(20))
    proposal = oracle.propose_tree(context, 2, 20, 0.0, n_parallel=2, split_confidence=0.0)
    tree = proposal.tokens
    assert tree.parents == (-1, 0, -1, 2) and tree.branches == ((0,), (0,), (1,), (1,))
    assert proposal.n_steps == 2 and proposal.n_splits == 1
    assert tree[0] != tree[2]


def test_no_split_at_or_above_one_half():
    # candidates are sorted and share what the top one leaves: p_k <= min(p_0, 1 - p_0) <= 0.5, so with the paper
    # script's -ps 0.9 (and p_adjust 0) a tree never splits, as in the code
    for seed in range(200):
        oracle = _oracle(0.5, seed, vocab=32000)
        context = tuple(oracle.tokens.token(p) for p in range(20))
        assert oracle.propose_tree(context, 4, 20, 0.0, n_parallel=3, split_confidence=0.5).n_splits == 0
        assert max(oracle._alternatives(20 + seed, 0.3, None)[0]) <= 0.3


# -- the strategy -------------------------------------------------------------------------------------------
def _drive_tree(alpha, seed, variant, n_parallel=3, p_split=0.1, n_generate=40, **params):
    oracle = _oracle(alpha, seed)
    prompt = [oracle.tokens.token(p) for p in range(PROMPT_LEN)]
    strategy = make_strategy("pipeinfer", prompt, n_generate,
                             {"variant": variant, "n_parallel": n_parallel, "p_split": p_split, **params})
    launched: list = []
    original = strategy._launch_speculative

    def spy(tokens):
        actions = original(tokens)
        launched.extend(a.run for a in actions if isinstance(a, LaunchRun))
        return actions

    strategy._launch_speculative = spy
    return strategy, drive(strategy, oracle.tokens, oracle, random.Random(seed)), launched


@pytest.mark.parametrize("variant", ["reference", "continuous"])
def test_tree_drafts_reproduce_target_only_output_with_exact_kv_contexts(variant):
    trees = 0
    for seed in range(30):
        for alpha in (0.3, 0.7, 0.95):
            for n_parallel, n_partitions in ((2, 1000), (3, 2)):
                strategy, result, launched = _drive_tree(alpha, seed, variant, n_parallel,
                                                         n_partitions=n_partitions, micro_batch=3)
                assert result.output == result.truth, (variant, seed, alpha, n_parallel)
                assert strategy.pool.n_used == 0
                trees += sum("tree_parents" in run.meta for run in launched)
    assert trees > 500  # the runs did carry trees (and the KV model checked every node's context)


def test_a_tree_run_carries_every_node_with_its_branches_sequence_ids():
    strategy, _result, launched = _drive_tree(0.7, 2, "reference", n_parallel=3)
    tree_runs = [run for run in launched if "tree_parents" in run.meta]
    assert tree_runs
    for run in tree_runs:
        base = (run.partition - 1) * 3 + 1  # speculative.cpp: seq_offset = i * n_seq_dft + 1
        own = {base, base + 1, base + 2}
        assert set(run.seq_ids) <= own and base in run.seq_ids
        assert len(run.tokens) == len(run.positions) == len(run.meta["token_seqs"])
        for node, parent in enumerate(run.meta["tree_parents"]):
            if parent >= 0:  # a child is one position further and its branches are among its parent's
                assert run.positions[node] == run.positions[parent] + 1
                assert set(run.meta["token_seqs"][node]) <= set(run.meta["token_seqs"][parent])
        assert run.positions == sorted(run.positions)  # the target batch in drafting order


def test_tree_kv_transactions_as_counted_in_speculative_cpp():
    # n_partitions 2, n_parallel 3: max_seq = 2 * 3 + 1 = 7. start_async_spec_run: seq_rm + seq_cp for each of the
    # 3 sequences (6), begin_async_run: one seq_rm each (3) -> 9. Verification: 3 tail removals, seq 0's rm + cp
    # (2), rm + cp for sequences 1..7 (14) -> 19. A non-speculative run: rm of sequences 0..7 (8) before, cp of 0 to
    # 1..7 (7) after. (A split's seq_rm + seq_cp are on the draft's own context, not relayed.)
    assert reference_kv_transactions(2, 3) == {"spec_launch": 9, "verify": 19, "nonspec_before": 8,
                                               "nonspec_after": 7}



def test_tree_kv_transaction_messages_address_the_partitions_sequences_and_the_kept_branch():
    # partition 2 of n_parallel 3 owns sequence ids 4, 5, 6 (seq_offset = (2 - 1) * 3 + 1); max_seq = 7
    launch = reference_kv_transaction_ops("spec_launch", (4, 1, 9, 10), 2, 3)
    assert launch == [KVOp("rm", 4, p0=9, p1=None), KVOp("cp", 1, 4, 9, 10), KVOp("rm", 5, p0=9, p1=None),
                      KVOp("cp", 1, 5, 9, 10), KVOp("rm", 6, p0=9, p1=None), KVOp("cp", 1, 6, 9, 10),
                      KVOp("rm", 4, p0=10, p1=11), KVOp("rm", 5, p0=10, p1=11), KVOp("rm", 6, p0=10, p1=11)]
    verify = reference_kv_transaction_ops("verify", (4, 10, 12, 5), 2, 3)  # branch 1 (sequence 5) was kept
    assert verify[:5] == [KVOp("rm", 4, p0=12, p1=None), KVOp("rm", 5, p0=12, p1=None),
                          KVOp("rm", 6, p0=12, p1=None), KVOp("rm", 0, p0=10, p1=12), KVOp("cp", 5, 0, 10, 12)]
    assert verify[5:] == [op for s in range(1, 8) for op in (KVOp("rm", s, p0=10, p1=12), KVOp("cp", 0, s, 10, 12))]
    assert len(launch) == 9 and len(verify) == 19  # the counts of the test above

def _launches(actions):
    return [a.run for a in actions if isinstance(a, LaunchRun)]


@pytest.mark.parametrize("case", ["sibling roots, branch 0 wins", "split at depth 1, branch 1 wins"])
def test_a_hand_worked_tree_run_through_the_reference(case):
    strategy = make_strategy("pipeinfer", [5, 6, 7], 20, {"n_parallel": 3, "n_partitions": 2, "micro_batch": 3})
    (prefill,) = _launches(strategy.start())
    actions = strategy.on_logits(prefill.run_id, [8])  # token 8 at position 3
    (n8,) = _launches(actions)
    assert n8.kv_transactions == 8  # rm of sequences 0..7 at its position
    request = next(a for a in actions if isinstance(a, RequestDraft))
    assert request.n_parallel == 3 and request.split_confidence == pytest.approx(0.1)
    if case.startswith("sibling"):
        # branch 0: 9, 10 at positions 4, 5; branch 1 split at the root: 20, 21
        tree = TokenTree([9, 10, 20, 21], [-1, 0, -1, 2], [(0,), (0,), (1,), (1,)])
        tokens, positions, seqs = [9, 20, 10, 21], [4, 4, 5, 5], [(1,), (2,), (1,), (2,)]
        predictions = [10, 0, 12, 0]  # after 9: 10 (branch 0's next), after 10: 12 (bonus)
        generated, kept = [8, 9, 10, 12], 1
    else:
        # branch 0: 9, 10; branch 1 shares 9 and splits at depth 1 with 30
        tree = TokenTree([9, 10, 30], [-1, 0, 0], [(0, 1), (0,), (1,)])
        tokens, positions, seqs = [9, 10, 30], [4, 5, 5], [(1, 2), (1,), (2,)]
        predictions = [30, 0, 31]  # after 9: 30 (branch 1's), after 30: 31 (bonus)
        generated, kept = [8, 9, 30, 31], 2
    (spec,) = _launches(strategy.on_draft(request.request_id, tree))
    assert (spec.tokens, spec.positions, list(spec.meta["token_seqs"])) == (tokens, positions, seqs)
    assert [(op.kind, op.seq, op.dst) for op in spec.kv_ops] == [("cp", 0, 1), ("cp", 0, 2), ("cp", 0, 3)]
    assert spec.kv_transactions == 7 + 9  # n8's copies to 1..7, then the launch's own
    assert strategy.draft_kv_transactions == 2  # one split
    (n9,) = _launches(strategy.on_logits(n8.run_id, [9]))  # 9 is branch 0's root: the run survives
    assert n9.kv_transactions == 8
    actions = strategy.on_logits(spec.run_id, predictions)
    assert strategy.generated == generated
    (n_last,) = _launches(actions)
    assert n_last.kv_transactions == 7 + 19 + 8
    # s_keep's accepted cell (position 5) joins sequence 0; the partition's three sequences are removed
    ops = [(op.kind, op.seq, op.dst, op.p0, op.p1) for op in n_last.kv_ops]
    assert ops[:4] == [("cp", kept, 0, 5, 6), ("rm", 1, -1, 0, None), ("rm", 2, -1, 0, None), ("rm", 3, -1, 0, None)]
    # the relayed messages (the executor's, reference_kv_transaction_ops): n9's copies of sequence 0 to 1..7, then
    # the verification, which removes the partition's sequences 1..3 from position 6 (the next run's token) on and
    # takes sequence 0 over [4, 6) from the kept sequence, then n_last's removals of 0..7
    relayed = [op for occasion, where in n_last.meta["kv_tx"]
               for op in reference_kv_transaction_ops(occasion, where, 2, 3)]
    assert len(relayed) == n_last.kv_transactions
    assert relayed[7:12] == [KVOp("rm", 1, p0=6, p1=None), KVOp("rm", 2, p0=6, p1=None),
                             KVOp("rm", 3, p0=6, p1=None), KVOp("rm", 0, p0=4, p1=6), KVOp("cp", kept, 0, 4, 6)]


def test_the_reference_judges_a_tree_run_by_branch_0():
    # check_for_cancel's loop over the branches ends with branch 0, whose verdict stands: a run whose branch 0 root
    # lost is cancelled although its branch 1 root (20) is the committed token
    strategy = make_strategy("pipeinfer", [5, 6, 7], 20, {"n_parallel": 3, "n_partitions": 2})
    (prefill,) = _launches(strategy.start())
    actions = strategy.on_logits(prefill.run_id, [8])
    (n8,) = _launches(actions)
    request = next(a for a in actions if isinstance(a, RequestDraft))
    (spec,) = _launches(strategy.on_draft(request.request_id,
                                          TokenTree([9, 10, 20, 21], [-1, 0, -1, 2], [(0,), (0,), (1,), (1,)])))
    actions = strategy.on_logits(n8.run_id, [20])
    cancels = [a for a in actions if type(a).__name__ == "CancelRuns"]
    assert cancels and spec.run_id in cancels[0].run_ids
    assert strategy.generated == [8, 20]


def _tokens_per_verification(n_parallel: int, variant: str) -> tuple[float, float]:
    """Tokens committed per verification that committed any, and drafted tokens accepted per verification, on the
    paper's cluster with the confidence oracle."""
    from pipesim.scenario import load_scenario
    from pipesim.sim import simulate

    committed = accepted = count = 0
    for seed in range(3):
        scenario = load_scenario(PAPER, ["strategy.name=pipeinfer", f"strategy.variant={variant}",
                                         "workload.generate_tokens=64", "acceptance.alpha=0.5",
                                         "acceptance.confidence=true", f"acceptance.seed={seed}",
                                         f"strategy.n_parallel={n_parallel}", "strategy.p_split=0.1"])
        for record in simulate(scenario).records:
            if record.kind == "tokens" and record.checked:
                committed += record.n_tokens
                accepted += record.accepted
                count += 1
    return committed / count, accepted / count


@pytest.mark.parametrize("variant", ["reference", "continuous"])
def test_trees_accept_more_tokens_per_verification_than_the_linear_draft_in_the_simulator(variant):
    # same alpha, same draft budget (--draft 3), same seeds: a tree's extra branches catch tokens the main one
    # misses, so each verification accepts more
    linear = _tokens_per_verification(1, variant)
    tree = _tokens_per_verification(3, variant)
    assert tree[1] > linear[1] * 1.05, (linear, tree)
    assert tree[0] > linear[0], (linear, tree)


def test_trees_are_pipeinfers_and_need_the_confidence_oracle():
    from pipesim.scenario import ScenarioError, load_scenario

    with pytest.raises(ScenarioError, match="n_parallel=3 needs acceptance.confidence"):
        load_scenario(PAPER, ["strategy.n_parallel=3"])
    with pytest.raises(ScenarioError, match="token trees are drafted by pipeinfer only"):
        load_scenario(PAPER, ["strategy.name=speculative", "strategy.n_parallel=2"])


# -- the executor ---------------------------------------------------------------------------------------------
EMULATED = """
name: emulated-trees
models: {target: llama-2-7b, target_quantization: q4_k_m, draft: tinyllama-1.1b, draft_quantization: q4_k_m}
cluster: {count: 4, flops: 20T, memory_bandwidth: 1TB/s}
network: {bandwidth: 10Gbit/s, latency: 50us}
acceptance: {alpha: 0.6, confidence: true}
workload: {prompt_tokens: 32, generate_tokens: 40}
strategy: {name: pipeinfer, n_parallel: 3, kv_transactions: compact}
executor: {compute: emulated, timeout_s: 60}
"""


def test_the_executor_runs_trees_with_emulated_compute_and_matches_target_only(tmp_path):
    import json
    import subprocess
    import sys

    scenario, saved = tmp_path / "trees.yaml", tmp_path / "traces.json"
    scenario.write_text(EMULATED)
    variants = ["strategy.variant=reference", "strategy.variant=continuous",
                "strategy.variant=continuous;placement.draft_node=3;placement.layer_split=[0.4,0.3,0.3,0]"]
    argv = [sys.executable, "-m", "pipesim.cli", "run", str(scenario), "--ranks", "4", "--json",
            "--save-trace", str(saved)]
    for variant in variants:
        argv += ["--variant", variant]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=PAPER.parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    entries = json.loads(saved.read_text())
    assert [entry["variant"] for entry in entries] == variants
    for entry in entries:
        assert entry["trace"]["meta"]["matches_reference"] is True, entry["variant"]
        launched = [r[5] for r in entry["trace"]["records"] if r[0] == "launch" and r[12]]  # speculative runs
        assert max(launched) > 3, entry["variant"]  # more nodes than --draft 3: runs carried trees


def test_the_executor_refuses_trees_with_real_compute():
    from pipesim.executor.errors import ExecutorSetupError
    from pipesim.executor.plan import make_plan
    from pipesim.scenario import load_scenario

    scenario = load_scenario(PAPER.parent / "local-tiny.yaml", ["strategy.name=pipeinfer", "strategy.n_parallel=2",
                                                                 "acceptance.confidence=true"])
    with pytest.raises(ExecutorSetupError, match="n_parallel=2: token trees run in the executor with "
                                                 "executor.compute=emulated only"):
        make_plan(scenario, scenario.cluster.count)
