"""KVCache: llama.cpp-style cells with sequence sets (seq_cp / seq_rm / seq_keep) and the attention rule."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pipesim.models.kv_cache import KVCache, KVCacheFullError, token_seq_mask  # noqa: E402


def make_cache(capacity: int = 16, max_seqs: int = 4) -> KVCache:
    return KVCache(n_layers=2, capacity=capacity, n_kv_heads=1, head_dim=2, max_seqs=max_seqs)


def put(kv: KVCache, positions: list[int], seqs: list) -> torch.Tensor:
    return kv.store(torch.tensor(positions), token_seq_mask(seqs, kv.max_seqs))


def test_store_takes_lowest_free_cells_and_tags_them():
    kv = make_cache()
    cells = put(kv, [0, 1, 2], [0, 0, 0])
    assert cells.tolist() == [0, 1, 2]
    assert kv.used_cells() == 3 and kv.span() == 3
    assert kv.seq_positions(0) == [0, 1, 2]
    assert kv.seq_pos_max(0) == 2 and kv.seq_pos_max(1) == -1
    assert put(kv, [3], [0]).tolist() == [3]


def test_allocate_does_not_reserve_and_reuses_freed_cells():
    kv = make_cache()
    put(kv, [0, 1, 2, 3], [0, 0, 0, 0])
    kv.seq_rm(0, 1, 3)  # frees cells 1 and 2
    assert kv.used_cells() == 2
    assert kv.allocate(2).tolist() == [1, 2]
    assert kv.allocate(2).tolist() == [1, 2]  # allocate alone changes nothing
    assert put(kv, [4, 5, 6], [0, 0, 0]).tolist() == [1, 2, 4]


def test_seq_cp_shares_cells_without_copying():
    kv = make_cache()
    put(kv, [0, 1, 2, 3], [0, 0, 0, 0])
    kv.seq_cp(0, 1, 1, 3)
    assert kv.seq_positions(1) == [1, 2]
    kv.seq_cp(0, 2, 2, None)  # p1=None: to the end
    assert kv.seq_positions(2) == [2, 3]
    kv.seq_cp(0, 3, -1, -1)  # negative bounds are open, as in llama.cpp
    assert kv.seq_positions(3) == [0, 1, 2, 3]
    assert kv.used_cells() == 4


def test_seq_rm_frees_only_cells_left_without_sequence():
    kv = make_cache()
    put(kv, [0, 1, 2], [0, 0, 0])
    kv.seq_cp(0, 1)
    put(kv, [3, 4], [1, 1])  # speculative tokens only in seq 1
    assert kv.used_cells() == 5
    kv.seq_rm(1, 2, None)
    assert kv.seq_positions(1) == [0, 1]
    assert kv.seq_positions(0) == [0, 1, 2]
    assert kv.used_cells() == 3  # positions 3, 4 freed; position 2 is still seq 0's
    kv.seq_rm(-1, 2)  # any sequence
    assert kv.seq_positions(0) == [0, 1] and kv.used_cells() == 2
    kv.seq_rm(0)
    assert kv.seq_positions(1) == [0, 1] and kv.used_cells() == 2
    kv.seq_rm(1)
    assert kv.used_cells() == 0 and kv.span() == 0


def test_seq_keep_drops_other_sequences():
    kv = make_cache()
    put(kv, [0, 1], [[0, 1], [0, 1]])
    put(kv, [2, 2, 3], [1, 2, 2])
    kv.seq_keep(1)
    assert kv.seq_positions(1) == [0, 1, 2]
    assert kv.seq_positions(0) == [] and kv.seq_positions(2) == []
    assert kv.used_cells() == 3
    kv.clear()
    assert kv.used_cells() == 0


def test_release_frees_cells_whatever_their_sequences():
    kv = make_cache()
    cells = put(kv, [0, 1], [[0, 1], 2])
    kv.release(cells)
    assert kv.used_cells() == 0 and not bool(kv.cell_seqs.any())


def test_attention_mask_follows_the_rule():
    gen = torch.Generator().manual_seed(3)
    kv = make_cache(capacity=24, max_seqs=3)
    n = 14
    positions = torch.randint(0, 6, (n,), generator=gen)
    seqs = torch.rand(n, 3, generator=gen) < 0.4
    seqs[:, 0] |= ~seqs.any(dim=1)
    kv.store(positions, seqs)
    kv.seq_rm(2, 4)  # some cells lose a sequence, some are freed
    q_pos = torch.randint(0, 7, (5,), generator=gen)
    q_seqs = torch.rand(5, 3, generator=gen) < 0.5
    q_seqs[:, 1] |= ~q_seqs.any(dim=1)
    mask = kv.attention_mask(q_pos, q_seqs)
    assert mask.shape == (5, 24) and mask.dtype == torch.bool
    for i in range(5):
        for j in range(24):
            used = int(kv.cell_pos[j]) >= 0
            shares = bool((kv.cell_seqs[j] & q_seqs[i]).any())
            assert bool(mask[i, j]) == (used and int(kv.cell_pos[j]) <= int(q_pos[i]) and shares)
    span = kv.span()
    assert torch.equal(kv.attention_mask(q_pos, q_seqs, span), mask[:, :span])
    assert not bool(mask[:, span:].any())


def test_batch_tokens_see_themselves_causally():
    kv = make_cache()
    positions = torch.tensor([0, 1, 2, 2])
    seqs = token_seq_mask([[0, 1], [0, 1], 0, 1], kv.max_seqs)  # a small token tree
    kv.store(positions, seqs)
    mask = kv.attention_mask(positions, seqs, kv.span())
    assert mask.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, True, False, True],
    ]


def test_full_cache_error_names_capacity_and_request():
    kv = make_cache(capacity=4)
    put(kv, [0, 1, 2], [0, 0, 0])
    with pytest.raises(KVCacheFullError, match=r"capacity 4 cells, 3 in use, 2 asked"):
        kv.allocate(2)
    assert kv.used_cells() == 3


def test_invalid_arguments_are_named():
    kv = make_cache(max_seqs=2)
    with pytest.raises(ValueError, match="dst sequence id 5"):
        kv.seq_cp(0, 5)
    with pytest.raises(ValueError, match="token_seqs must have shape"):
        kv.store(torch.tensor([0]), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one sequence"):
        kv.store(torch.tensor([0]), torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="sequence id 7"):
        token_seq_mask([0, 7], 2)
    with pytest.raises(ValueError, match="capacity"):
        KVCache(1, 0, 1, 2)


@pytest.mark.parametrize("seed", range(5))
def test_random_sequence_operations_match_a_set_model(seed):
    """Cells and their sequence sets after random store/cp/rm/keep/release equal a plain Python model of
    llama.cpp's rules (a cell is freed when it holds no sequence), so the kept per-cell counts never drift."""
    import random

    rng = random.Random(seed)
    max_seqs, capacity = 6, 40
    kv = KVCache(1, capacity, 1, 2, max_seqs=max_seqs)
    model: dict[int, tuple[int, set[int]]] = {}  # cell -> (position, sequences)
    for _ in range(300):
        op = rng.choice(["store", "store", "cp", "rm", "rm_all", "keep", "release"])
        if op == "store" and len(model) < capacity - 3:
            n = rng.randint(1, 3)
            seqs = [{rng.randrange(max_seqs)} | ({rng.randrange(max_seqs)} if rng.random() < 0.3 else set())
                    for _ in range(n)]
            positions = [rng.randrange(30) for _ in range(n)]
            cells = kv.store(torch.tensor(positions), token_seq_mask(seqs, max_seqs))
            for cell, pos, s in zip(cells.tolist(), positions, seqs, strict=True):
                model[cell] = (pos, set(s))
        elif op == "cp":
            src, dst, p0, p1 = rng.randrange(max_seqs), rng.randrange(max_seqs), rng.randrange(20), rng.randrange(40)
            kv.seq_cp(src, dst, p0, p1)
            for pos, s in model.values():
                if src in s and p0 <= pos < p1:
                    s.add(dst)
        elif op in ("rm", "rm_all"):
            seq = -1 if op == "rm_all" else rng.randrange(max_seqs)
            p0, p1 = rng.randrange(20), rng.choice([None, rng.randrange(40)])
            kv.seq_rm(seq, p0, p1)
            for cell, (pos, s) in list(model.items()):
                if p0 <= pos < (p1 if p1 is not None else 10**9):
                    s.difference_update(range(max_seqs) if seq < 0 else {seq})
                    if not s:
                        del model[cell]
        elif op == "keep" and rng.random() < 0.2:
            seq = rng.randrange(max_seqs)
            kv.seq_keep(seq)
            for cell, (_pos, s) in list(model.items()):
                s.intersection_update({seq})
                if not s:
                    del model[cell]
        elif op == "release" and model:
            cell = rng.choice(sorted(model))
            kv.release(torch.tensor([cell]))
            del model[cell]
        assert kv.used_cells() == len(model)
        for seq in range(max_seqs):
            assert kv.seq_positions(seq) == sorted(pos for pos, s in model.values() if seq in s)
