"""Which free cached block to evict: the free queue behind `BlockPool`, one class per policy.

The pool keeps every block with ref_cnt 0 in one free queue and hands out its head; a handed-out
block that still carries a hash is an eviction. The order of that queue is the eviction policy:

- "lru" (the engine's default, `FreeBlockQueue`): least recently freed first, O(1) linked list.
- "fifo": the block whose contents were computed earliest first, however often it was hit.
- "lfu": the least-hit block first (hits since its contents were computed), ties least
  recently freed first.
- "belady": the block whose next use lies farthest in the future first (Belady's MIN, the
  offline optimum for one request at a time). Only a simulator knows the future: it passes
  `next_use(block_hash)`, the index of the next access of that block (inf: never again).

Blocks without a hash hold nothing reusable; every policy but "lru" hands them out first ("lru"
keeps the engine's plain free order, which already frees a request's unshared tail first).
The heap policies use lazy deletion: a removed block's heap entry stays until popped and is
skipped then, so `remove` is O(1) and `popleft` O(log n) amortized.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator

from kvserve.kv.block import FreeBlockQueue, KVBlock

EVICTION_POLICIES = ("lru", "fifo", "lfu", "belady")

NextUse = Callable[[bytes], float]
# (0, 0) for a block without a hash, which goes first; (1, rank) for a cached block.
Priority = tuple[int, float]
_UNHASHED: Priority = (0, 0.0)


class _HeapQueue:
    """Free blocks by `_priority(block)`, smallest first; ties least recently freed first."""

    def __init__(self) -> None:
        self._heap: list[tuple[Priority, int, KVBlock]] = []
        self._members: dict[int, int] = {}  # block_id -> seq of its live heap entry
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, block: KVBlock) -> bool:
        return block.block_id in self._members

    def append(self, block: KVBlock) -> None:
        if block.block_id in self._members:
            raise ValueError(f"{block} is already in the free queue")
        seq = next(self._seq)
        self._members[block.block_id] = seq
        heapq.heappush(self._heap, (self._priority(block), seq, block))

    def remove(self, block: KVBlock) -> None:
        if self._members.pop(block.block_id, None) is None:
            raise ValueError(f"{block} is not in the free queue")

    def popleft(self) -> KVBlock:
        while self._heap:
            priority, seq, block = heapq.heappop(self._heap)
            if self._members.get(block.block_id) != seq:
                continue  # removed (or re-added) since this entry was pushed
            current = self._priority(block)
            if priority != current:  # stale priority: requeue
                heapq.heappush(self._heap, (current, seq, block))
                continue
            del self._members[block.block_id]
            return block
        raise ValueError("no free blocks")

    def refresh(self, block: KVBlock) -> None:
        """Re-rank a free block whose priority may have dropped (its next use moved later).

        A second entry with the same seq is pushed; whichever is popped first wins and the
        other is skipped. (A risen priority needs no call: `popleft` requeues stale entries.)
        """
        seq = self._members.get(block.block_id)
        if seq is not None:
            heapq.heappush(self._heap, (self._priority(block), seq, block))

    def __iter__(self) -> Iterator[KVBlock]:
        """Blocks in eviction order (sorts; for tests and invariant checks)."""
        live = {e[2].block_id: e for e in self._heap if self._members.get(e[2].block_id) == e[1]}
        ordered = sorted(live.values(), key=lambda e: (self._priority(e[2]), e[1]))
        return (e[2] for e in ordered)

    def block_ids(self) -> list[int]:
        return [block.block_id for block in self]

    def note_new(self, block: KVBlock) -> None:
        """`block` was handed out to be filled with new contents."""

    def note_hit(self, block: KVBlock) -> None:
        """`block` gained a reference (a prefix hit or a fork)."""

    def _priority(self, block: KVBlock) -> Priority:
        if block.block_hash is None:
            return _UNHASHED
        return (1, self._rank(block))

    def _rank(self, block: KVBlock) -> float:
        """A cached block's place in the eviction order, smallest first."""
        raise NotImplementedError


class FifoQueue(_HeapQueue):
    """Evicts the block computed earliest."""

    def __init__(self) -> None:
        super().__init__()
        self._births: dict[int, int] = {}
        self._clock = itertools.count()

    def note_new(self, block: KVBlock) -> None:
        self._births[block.block_id] = next(self._clock)

    def _rank(self, block: KVBlock) -> float:
        return float(self._births.get(block.block_id, -1))


class LfuQueue(_HeapQueue):
    """Evicts the block with the fewest hits since it was computed; ties LRU."""

    def __init__(self) -> None:
        super().__init__()
        self._hits: dict[int, int] = {}

    def note_new(self, block: KVBlock) -> None:
        self._hits[block.block_id] = 0

    def note_hit(self, block: KVBlock) -> None:
        self._hits[block.block_id] = self._hits.get(block.block_id, 0) + 1

    def _rank(self, block: KVBlock) -> float:
        return float(self._hits.get(block.block_id, 0))


class BeladyQueue(_HeapQueue):
    """Evicts the block used again farthest in the future (never-again blocks first)."""

    def __init__(self, next_use: NextUse) -> None:
        super().__init__()
        self._next_use = next_use

    def _rank(self, block: KVBlock) -> float:
        assert block.block_hash is not None  # `_priority` ranks only cached blocks
        return -self._next_use(block.block_hash)


class LruQueue(FreeBlockQueue):
    """The engine's free queue (least recently freed first) under the policy interface."""

    def __init__(self) -> None:
        super().__init__([])

    def __contains__(self, block: KVBlock) -> bool:
        return block.in_free_queue

    def note_new(self, block: KVBlock) -> None:
        pass

    def note_hit(self, block: KVBlock) -> None:
        pass

    def refresh(self, block: KVBlock) -> None:
        pass


EvictionQueue = LruQueue | FifoQueue | LfuQueue | BeladyQueue


def new_eviction_queue(policy: str = "lru", next_use: NextUse | None = None) -> EvictionQueue:
    """An empty free queue that evicts by `policy` (one of EVICTION_POLICIES).

    Raises:
        ValueError: an unknown policy, or "belady" without `next_use` (or `next_use` with
            another policy).
    """
    if policy not in EVICTION_POLICIES:
        raise ValueError(f"eviction_policy: must be one of {EVICTION_POLICIES}, got {policy!r}")
    if (policy == "belady") != (next_use is not None):
        raise ValueError("eviction_policy: 'belady' needs next_use (the future), others take none")
    if next_use is not None:
        return BeladyQueue(next_use)
    if policy == "fifo":
        return FifoQueue()
    return LfuQueue() if policy == "lfu" else LruQueue()
