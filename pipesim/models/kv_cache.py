"""KV cache of one pipeline stage, with llama.cpp-style cells that belong to sets of sequences.

Each cell holds the keys and values of one token position for every layer the stage holds. A cell carries
a position (``-1`` = free) and a set of sequence ids: sequence 0 is the canonical sequence, ``1..max_seqs-1``
are speculative partitions. A cell may belong to several sequences at once (``seq_cp`` shares a prefix
without copying tensors), which is how speculative runs reuse the canonical context.

Attention rule (``attention_mask``): token i may attend cell j iff cell j is in use,
``cell_pos[j] <= positions[i]`` and the cell shares at least one sequence with the token. A batch's own
tokens are placed in the cache before attention, so causal attention inside a batch follows from the rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["KVCache", "KVCacheFullError", "token_seq_mask"]

SEQ_COLUMNS_DIRECT = 8  # up to this many sequences, masks use every column (selecting them costs more)


class KVCacheFullError(RuntimeError):
    """Raised when a batch needs more free cells than the cache has left."""


def token_seq_mask(seqs: Sequence[int | Iterable[int]], max_seqs: int) -> torch.Tensor:
    """Bool mask [n_tokens, max_seqs] from one sequence id, or an iterable of ids, per token."""
    mask = torch.zeros((len(seqs), max_seqs), dtype=torch.bool)
    for i, entry in enumerate(seqs):
        ids = [entry] if isinstance(entry, int) else list(entry)
        if not ids:
            raise ValueError(f"token {i} belongs to no sequence")
        for seq in ids:
            if not 0 <= seq < max_seqs:
                raise ValueError(f"token {i}: sequence id {seq} out of range [0, {max_seqs})")
            mask[i, seq] = True
    return mask


def _as_bound(p: int | None, open_value: int) -> int:
    """llama.cpp convention: None or a negative bound means 'open'."""
    return open_value if p is None or p < 0 else int(p)


class KVCache:
    """Keys/values [n_layers, capacity, n_kv_heads, head_dim] plus per-cell position and sequence set."""

    def __init__(
        self,
        n_layers: int,
        capacity: int,
        n_kv_heads: int,
        head_dim: int,
        max_seqs: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for field, value, low in (
            ("n_layers", n_layers, 0),
            ("capacity", capacity, 1),
            ("n_kv_heads", n_kv_heads, 1),
            ("head_dim", head_dim, 1),
            ("max_seqs", max_seqs, 1),
        ):
            if int(value) != value or value < low:
                raise ValueError(f"KVCache {field} must be an integer >= {low}, got {value!r}")
        self.n_layers = n_layers
        self.capacity = capacity
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.max_seqs = max_seqs
        shape = (n_layers, capacity, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.cell_pos = torch.full((capacity,), -1, dtype=torch.int64, device=device)
        self.cell_seqs = torch.zeros((capacity, max_seqs), dtype=torch.bool, device=device)
        # how many sequences each cell holds, so freeing the emptied cells never scans all max_seqs columns
        self.cell_nseq = torch.zeros((capacity,), dtype=torch.int32, device=device)

    # ----------------------------------------------------------------- inspection

    def used_cells(self) -> int:
        """Number of cells in use."""
        return int((self.cell_pos >= 0).sum())

    def span(self) -> int:
        """One past the highest used cell index (0 when empty); attention only needs cells below it."""
        used = torch.nonzero(self.cell_pos >= 0)
        return int(used[-1, 0]) + 1 if used.numel() else 0

    def seq_pos_max(self, seq: int) -> int:
        """Highest position held by ``seq`` (-1 when the sequence is empty)."""
        self._check_seq(seq, "seq")
        cells = self.cell_seqs[:, seq]
        return int(self.cell_pos[cells].max()) if bool(cells.any()) else -1

    def seq_positions(self, seq: int) -> list[int]:
        """Sorted positions held by ``seq`` (for tests and debugging)."""
        self._check_seq(seq, "seq")
        return sorted(self.cell_pos[self.cell_seqs[:, seq]].tolist())

    # ----------------------------------------------------------------- placing a batch

    def allocate(self, n: int) -> torch.Tensor:
        """Indices of ``n`` free cells (the lowest ones); does not mark them, ``assign`` does."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of cells ({n})")
        free = torch.nonzero(self.cell_pos < 0).flatten()
        if free.numel() < n:
            raise KVCacheFullError(
                f"KV cache full: capacity {self.capacity} cells, {self.capacity - free.numel()} in use, "
                f"{n} asked"
            )
        return free[:n]

    @torch.inference_mode()
    def assign(self, cells: torch.Tensor, positions: torch.Tensor, token_seqs: torch.Tensor) -> None:
        """Tag ``cells`` with the tokens' positions and sequence sets (marks them used)."""
        n = cells.numel()
        if positions.shape != (n,):
            raise ValueError(f"positions must have shape ({n},), got {tuple(positions.shape)}")
        self._check_token_seqs(token_seqs, n)
        if n and int(positions.min()) < 0:
            raise ValueError(f"positions must be >= 0, got min {int(positions.min())}")
        self.cell_pos[cells] = positions.to(self.cell_pos.device, torch.int64)
        self.cell_seqs[cells] = token_seqs.to(self.cell_seqs.device, torch.bool)
        self.cell_nseq[cells] = self.cell_seqs[cells].sum(dim=1, dtype=torch.int32)

    def store(self, positions: torch.Tensor, token_seqs: torch.Tensor) -> torch.Tensor:
        """Allocate one cell per token and tag it; returns the cell indices."""
        cells = self.allocate(positions.numel())
        self.assign(cells, positions, token_seqs)
        return cells

    @torch.inference_mode()
    def write(self, layer: int, cells: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write keys/values [n, n_kv_heads, head_dim] of one (stage-local) layer into ``cells``."""
        self.k[layer, cells] = k.to(self.k.dtype)
        self.v[layer, cells] = v.to(self.v.dtype)

    @torch.inference_mode()
    def release(self, cells: torch.Tensor) -> None:
        """Free ``cells`` whatever sequences they belong to (used when a run is aborted)."""
        self.cell_pos[cells] = -1
        self.cell_seqs[cells] = False
        self.cell_nseq[cells] = 0

    # ----------------------------------------------------------------- sequence operations

    @torch.inference_mode()
    def seq_cp(self, src: int, dst: int, p0: int | None = 0, p1: int | None = None) -> None:
        """Add ``dst`` to every cell of ``src`` with ``p0 <= pos < p1`` (None/negative bound = open)."""
        self._check_seq(src, "src")
        self._check_seq(dst, "dst")
        sel = torch.nonzero(self.cell_seqs[:, src] & ~self.cell_seqs[:, dst] & self._in_range(p0, p1)).flatten()
        self.cell_seqs[sel, dst] = True
        self.cell_nseq[sel] += 1

    @torch.inference_mode()
    def seq_rm(self, seq: int, p0: int | None = 0, p1: int | None = None) -> None:
        """Remove ``seq`` (-1: every sequence) from cells with ``p0 <= pos < p1``; empty cells are freed."""
        in_range = self._in_range(p0, p1)
        if seq < 0:
            self.cell_seqs[in_range] = False
            self.cell_nseq[in_range] = 0
            self.cell_pos[in_range] = -1
            return
        self._check_seq(seq, "seq")
        touched = torch.nonzero(in_range & self.cell_seqs[:, seq]).flatten()
        self.cell_seqs[touched, seq] = False
        self.cell_nseq[touched] -= 1
        self.cell_pos[touched[self.cell_nseq[touched] == 0]] = -1

    @torch.inference_mode()
    def seq_keep(self, seq: int) -> None:
        """Drop every sequence but ``seq``; cells that do not hold it are freed."""
        self._check_seq(seq, "seq")
        keep = self.cell_seqs[:, seq].clone()
        self.cell_seqs.zero_()
        self.cell_seqs[:, seq] = keep
        self.cell_nseq.copy_(keep)
        self.cell_pos[~keep] = -1

    @torch.inference_mode()
    def clear(self) -> None:
        """Free every cell."""
        self.cell_pos.fill_(-1)
        self.cell_seqs.zero_()
        self.cell_nseq.zero_()

    # ----------------------------------------------------------------- attention

    def attention_mask(
        self, positions: torch.Tensor, token_seqs: torch.Tensor, n_cells: int | None = None
    ) -> torch.Tensor:
        """Bool [n_tokens, n_cells] (default: capacity): True where token i may attend cell j."""
        n_cells = self.capacity if n_cells is None else n_cells
        if not 0 <= n_cells <= self.capacity:
            raise ValueError(f"n_cells must be in [0, {self.capacity}], got {n_cells}")
        n = positions.numel()
        self._check_token_seqs(token_seqs, n)
        cell_pos = self.cell_pos[:n_cells]
        cell_seqs = self.cell_seqs[:n_cells]
        if self.max_seqs > SEQ_COLUMNS_DIRECT:  # only the sequences the tokens belong to matter (a handful)
            used = torch.nonzero(token_seqs.any(dim=0)).flatten()
            token_seqs, cell_seqs = token_seqs[:, used], cell_seqs[:, used]
        shares = (token_seqs.to(self.cell_seqs.device, torch.float32) @ cell_seqs.to(torch.float32).T) > 0
        visible = (cell_pos[None, :] >= 0) & (cell_pos[None, :] <= positions.reshape(n, 1))
        return shares & visible

    # ----------------------------------------------------------------- helpers

    def _in_range(self, p0: int | None, p1: int | None) -> torch.Tensor:
        lo = _as_bound(p0, 0)
        hi = _as_bound(p1, torch.iinfo(torch.int64).max)
        return (self.cell_pos >= lo) & (self.cell_pos < hi)

    def _check_seq(self, seq: int, field: str) -> None:
        if not 0 <= seq < self.max_seqs:
            raise ValueError(f"{field} sequence id {seq} out of range [0, {self.max_seqs})")

    def _check_token_seqs(self, token_seqs: torch.Tensor, n: int) -> None:
        if token_seqs.shape != (n, self.max_seqs):
            raise ValueError(
                f"token_seqs must have shape ({n}, {self.max_seqs}) [n_tokens, max_seqs], "
                f"got {tuple(token_seqs.shape)}"
            )
        if n and not bool(token_seqs.any(dim=1).all()):
            raise ValueError(
                "every token must belong to at least one sequence (a token_seqs row is all False)"
            )
