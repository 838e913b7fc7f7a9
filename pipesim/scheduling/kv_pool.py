"""The pool of KV sequence partitions that in-flight speculative runs own (PipeInfer's multibuffering)."""

from __future__ import annotations

from collections import deque


class KVPartitionPool:
    """A bounded FIFO of free sequence-id partitions; no free partition means no new speculative run.

    Partition ids start at 1 (sequence 0 is the canonical sequence). Partitions are handed out in FIFO
    order, so a partition released last is reused last, as in PipeInfer's free-offset deque.
    """

    def __init__(self, n_partitions: int) -> None:
        if n_partitions < 1:
            raise ValueError(f"n_partitions must be >= 1, got {n_partitions}")
        self.capacity = n_partitions
        self._free: deque[int] = deque(range(1, n_partitions + 1))
        self._owned: set[int] = set()

    def acquire(self) -> int | None:
        """Take the oldest free partition, or None when all are in use."""
        if not self._free:
            return None
        partition = self._free.popleft()
        self._owned.add(partition)
        return partition

    def release(self, partition: int) -> None:
        """Return a partition to the back of the pool."""
        if partition not in self._owned:
            raise ValueError(f"partition {partition} is not in use")
        self._owned.remove(partition)
        self._free.append(partition)

    @property
    def in_use(self) -> tuple[int, ...]:
        """The partitions now owned, in id order."""
        return tuple(sorted(self._owned))

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_used(self) -> int:
        return len(self._owned)
