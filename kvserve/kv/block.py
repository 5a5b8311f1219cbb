"""One KV block's metadata and the O(1) queue of free blocks.

A `KVBlock` is the bookkeeping of one physical block of the KV cache (`block_size` token
slots in every layer's key and value tensors); it holds no tensor. `FreeBlockQueue` is an
intrusive doubly-linked list threaded through the blocks themselves, so taking a cached block
out of the middle when a prefix hit revives it costs O(1), as in vLLM v1:

    head <-> b3 <-> b7 <-> b1 <-> tail        popleft() takes b3 (least recently freed),
                                              append() adds at the tail (most recently freed),
                                              remove(b7) unlinks b7 in place.
"""

from __future__ import annotations

from collections.abc import Iterator


class KVBlock:
    """Metadata of one physical KV block.

    `ref_cnt` counts the block tables that hold the block; at 0 the block sits in the free
    queue but keeps `block_hash` (and its K/V contents) until it is reused, so a later request
    with the same prefix can revive it. `block_hash` is set only on a full block whose hash is
    registered in the pool's cached map.
    """

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None
        # Links of the free queue; both are None exactly when the block is not in the queue.
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    @property
    def in_free_queue(self) -> bool:
        return self.prev_free is not None

    def __repr__(self) -> str:
        hash_hex = None if self.block_hash is None else self.block_hash.hex()[:8]
        return f"KVBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={hash_hex})"


class FreeBlockQueue:
    """Blocks with ref_cnt 0, least recently freed first (the eviction order).

    Two sentinel blocks (id -1) bracket the list so that no operation special-cases an end.
    All operations are O(1) except iteration.

    Args:
        blocks: the initial free blocks, in the order they will be handed out.
    """

    def __init__(self, blocks: list[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._num_blocks = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._num_blocks

    def popleft(self) -> KVBlock:
        """Take the least recently freed block.

        Raises:
            ValueError: the queue is empty.
        """
        first = self._head.next_free
        if first is None or first is self._tail:
            raise ValueError("no free blocks")
        self.remove(first)
        return first

    def remove(self, block: KVBlock) -> None:
        """Unlink a block from anywhere in the queue (a cached block revived by a hit).

        Raises:
            ValueError: the block is not in the queue.
        """
        prev_block, next_block = block.prev_free, block.next_free
        if prev_block is None or next_block is None:
            raise ValueError(f"{block} is not in the free queue")
        prev_block.next_free = next_block
        next_block.prev_free = prev_block
        block.prev_free = block.next_free = None
        self._num_blocks -= 1

    def append(self, block: KVBlock) -> None:
        """Add a block at the tail: it will be the last one handed out.

        Raises:
            ValueError: the block is already in the queue.
        """
        if block.in_free_queue:
            raise ValueError(f"{block} is already in the free queue")
        last = self._tail.prev_free
        assert last is not None  # the tail sentinel always has a predecessor
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self._num_blocks += 1

    def __iter__(self) -> Iterator[KVBlock]:
        """Blocks from head (next to be handed out) to tail."""
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free

    def block_ids(self) -> list[int]:
        """Ids from head to tail; for tests and invariant checks."""
        return [block.block_id for block in self]


def require(ok: bool, message: str) -> None:
    """Invariant check for `check_invariants()`: unlike `assert`, it survives `python -O`.

    Raises:
        AssertionError: ok is False.
    """
    if not ok:
        raise AssertionError(message)
