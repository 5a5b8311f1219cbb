"""The pool of physical KV blocks: free queue, ref counts and the prefix-cache map.

Block 0 is the null block (`NULL_BLOCK_ID`): it is reserved at start-up, never handed out,
never freed and never hashed. Block tables use it as a placeholder for blocks a sliding window
has dropped, and the model runner may pad block tables and slot mappings with it. So a pool of
`num_blocks` blocks hands out at most `num_blocks - 1`, with ids 1, 2, ... in order:

    block ids:  [ 0 | 1  2  3 ... num_blocks-1 ]
                null  free queue, initially in id order

A block is in exactly one of two states: used (ref_cnt > 0, in some block table) or free
(ref_cnt 0, in the free queue). A free block keeps its hash and K/V until it is handed out
again, so the free queue doubles as the LRU list of cached blocks: handing out pops the head
(least recently freed) and evicts its hash, freeing appends at the tail. Other orders of the
free queue (FIFO, LFU, Belady's optimum for simulations) are in `eviction`.

With `enable_kv_events`, the pool records a `BlockStored` once a registered block is written, a
`BlockRemoved` when a cached block is evicted and `AllBlocksCleared` on a reset, in order, for
a listener to take (`take_events`); see `kv_events`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvserve.kv.block import KVBlock, require
from kvserve.kv.eviction import NextUse, new_eviction_queue
from kvserve.kv.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

NULL_BLOCK_ID = 0


class BlockPool:
    """All KV blocks of one cache, shared by every request.

    Args:
        num_blocks: physical blocks including the null block; at least 1.
        eviction_policy: the order in which free cached blocks are evicted (see `eviction`);
            "lru" is the engine's.
        next_use: for "belady" only: block hash -> index of its next access (inf: never).
        enable_kv_events: record stored / removed events for `take_events` (off: nothing
            is recorded, as nobody would take them).

    Raises:
        ValueError: num_blocks < 1, an unknown policy, or next_use given or missing wrongly.
    """

    def __init__(
        self,
        num_blocks: int,
        eviction_policy: str = "lru",
        next_use: NextUse | None = None,
        enable_kv_events: bool = False,
    ) -> None:
        if num_blocks < 1:
            message = "must be >= 1 (block 0 is the null block)"
            raise ValueError(f"num_blocks: {message}, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self._free_queue = new_eviction_queue(eviction_policy, next_use)
        for block in self.blocks[1:]:
            self._free_queue.append(block)
        self._cached: dict[bytes, KVBlock] = {}
        self._events: list[KVEvent] | None = [] if enable_kv_events else None
        self.num_evictions = 0

    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can be handed out: all but the null block."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_cnt 0, cached or not: what `get_new_blocks` can hand out."""
        return len(self._free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by some request (ref_cnt > 0), in [0, 1]."""
        if self.num_usable_blocks == 0:
            return 0.0
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def free_block_ids(self) -> list[int]:
        """Free block ids in the order they will be handed out (for tests and debugging)."""
        return self._free_queue.block_ids()

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Hand out `num_blocks` blocks from the head of the free queue, with ref_cnt 1.

        A block that still carries a hash loses it (an eviction, counted in `num_evictions`):
        its K/V are about to be overwritten.

        Raises:
            ValueError: fewer than `num_blocks` blocks are free (callers check first).
        """
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"asked for {num_blocks} blocks, {self.num_free_blocks} are free")
        blocks = [self._free_queue.popleft() for _ in range(num_blocks)]
        for block in blocks:
            self._evict(block)
            block.ref_cnt = 1
            self._free_queue.note_new(block)
        return blocks

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference to each block; blocks reaching 0 join the free queue's tail.

        Freed blocks keep their hash and contents, and the first block of `blocks` to reach 0
        is the first to be evicted later. Callers therefore pass a request's blocks in REVERSE
        table order (tail first): the tail of a sequence is the part least likely to be shared
        by a later request, so it is evicted before the shared prefix. The null block is
        skipped.

        Raises:
            ValueError: a block's ref_cnt is already 0.
        """
        for block in blocks:
            if block is self.null_block:
                continue
            if block.ref_cnt <= 0:
                raise ValueError(f"{block} freed more often than it was taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free_queue.append(block)

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference to each block (a prefix hit, or a fork sharing a block).

        A free block (ref_cnt 0) being revived leaves the free queue, so it cannot be evicted
        while in use. The null block is skipped.
        """
        for block in blocks:
            if block is self.null_block:
                continue
            if block.ref_cnt == 0:
                self._free_queue.remove(block)
            block.ref_cnt += 1
            self._free_queue.note_hit(block)

    def refresh_priority(self, block_hash: bytes) -> None:
        """The future of a cached block changed (simulators with "belady"): re-rank it if free."""
        block = self._cached.get(block_hash)
        if block is not None and block.ref_cnt == 0:
            self._free_queue.refresh(block)

    def get_cached_block(self, block_hash: bytes) -> KVBlock | None:
        """The block holding the prefix named by `block_hash`, if cached. No side effects."""
        return self._cached.get(block_hash)

    def cache_full_blocks(
        self, blocks: Sequence[KVBlock], block_hashes: Sequence[bytes]
    ) -> list[KVBlock]:
        """Register full blocks under their hashes, pairwise: they may be hit from now on.

        The K/V of a block registered while its step is being scheduled are written by that
        step's forward before any attention of the step reads them (one flat batch), so a
        request admitted later in the same step may hit it. A block that already has a hash
        is skipped. If another block is already cached under the same hash, the first one
        stays in the map and the new block stays unhashed: it is freed as a plain block later.

        Returns:
            The blocks newly registered, in order (`mark_stored` them once written).

        Raises:
            ValueError: the lengths differ, or the null block is passed.
        """
        if len(blocks) != len(block_hashes):
            raise ValueError(f"{len(blocks)} blocks but {len(block_hashes)} hashes")
        registered: list[KVBlock] = []
        for block, block_hash in zip(blocks, block_hashes, strict=True):
            if block is self.null_block:
                raise ValueError("the null block is never cached")
            if block.block_hash is not None or block_hash in self._cached:
                continue
            block.block_hash = block_hash
            self._cached[block_hash] = block
            registered.append(block)
        return registered

    def mark_stored(self, blocks: Sequence[KVBlock]) -> None:
        """The registered blocks' K/V are now written: a `BlockStored` event for each block
        that still carries its hash (a listener may read the block from now on)."""
        if self._events is None:
            return
        for block in blocks:
            if block.block_hash is not None and self._cached.get(block.block_hash) is block:
                self._events.append(BlockStored(block.block_hash, block.block_id))

    def uncache_blocks(self, blocks: Sequence[KVBlock]) -> None:
        """Drop the hashes of registered blocks whose step never ran (no event: no listener
        was told of them)."""
        for block in blocks:
            if block.block_hash is not None and self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
                block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only when no block is in use.

        Returns:
            True if the cache was reset, False (and nothing changed) if some block is in use.
        """
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        if self._events is not None:
            self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        """The events recorded since the last call, oldest first; clears them.

        Always [] when events are off.
        """
        if not self._events:
            return []
        events, self._events = self._events, []
        return events

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        block_hash = block.block_hash
        del self._cached[block_hash]
        block.block_hash = None
        self.num_evictions += 1
        if self._events is not None:
            self._events.append(BlockRemoved(block_hash, block.block_id))

    def check_invariants(self) -> None:
        """Raise AssertionError if the pool's structures disagree.

        Checks: the free queue holds exactly the usable blocks with ref_cnt 0, each once; free
        + used == usable; no ref_cnt is negative; every hashed block is in the map under its
        hash and every map entry points back; the null block is unused, unhashed, not free.
        """
        free_ids = self._free_queue.block_ids()
        require(len(free_ids) == len(set(free_ids)), f"free queue repeats a block: {free_ids}")
        require(len(free_ids) == len(self._free_queue), "free queue length is stale")
        zero_ids = {b.block_id for b in self.blocks[1:] if b.ref_cnt == 0}
        require(set(free_ids) == zero_ids, f"free queue {free_ids} != ref_cnt 0 {zero_ids}")
        num_used = sum(1 for b in self.blocks[1:] if b.ref_cnt > 0)
        require(len(free_ids) + num_used == self.num_usable_blocks, "free + used != total")
        null = self.null_block
        require(null.ref_cnt == 0 and null.block_hash is None, f"null block touched: {null}")
        require(null not in self._free_queue, "null block is in the free queue")
        for block in self.blocks:
            require(block.ref_cnt >= 0, f"negative ref_cnt: {block}")
            if block.block_hash is not None:
                cached = self._cached.get(block.block_hash)
                require(cached is block, f"{block} is hashed but not in the cached map")
        for block_hash, block in self._cached.items():
            require(block.block_hash == block_hash, f"map entry does not point back: {block}")
