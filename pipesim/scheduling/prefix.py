"""Small sequence helpers shared by engines."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences (fast when one extends the other)."""
    if type(a) is not type(b):
        a, b = tuple(a), tuple(b)
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class GrowingPrefix(Sequence):
    """The first ``n`` tokens of an append-only list followed by ``tail``, without copying them: a draft request's
    context, as a tuple of them would read (indexing, slices as tuples, iteration, equality), in O(1) to make.

    Valid while ``base`` only grows (a strategy's committed sequence): its first ``n`` tokens never change.
    """

    __slots__ = ("_base", "_len", "_n", "_tail")

    def __init__(self, base: list[int], n: int, tail: tuple[int, ...] = ()) -> None:
        self._base = base
        self._n = n
        self._tail = tail
        self._len = n + len(tail)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        n = self._n
        if type(index) is int and 0 <= index:
            return self._base[index] if index < n else self._tail[index - n]
        if isinstance(index, slice):
            start, stop, step = index.indices(self._len)
            if step != 1:
                return tuple(self)[index]
            head = tuple(self._base[start:min(stop, n)]) if start < n else ()
            return head + self._tail[max(start - n, 0):max(stop - n, 0)] if stop > n else head
        if index < 0:
            index += self._len
            if index < 0:
                raise IndexError("context index out of range")
        if index < n:
            return self._base[index]
        return self._tail[index - n]

    def __iter__(self):
        yield from islice(self._base, self._n)
        yield from self._tail

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (tuple, list, GrowingPrefix)):
            return len(self) == len(other) and tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"GrowingPrefix({tuple(self)!r})"
