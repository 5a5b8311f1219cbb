"""The scheduler's only interface to KV memory: block tables, prefix hits, copy-on-write.

Cache modes (`cache_mode`):
- "paged" (default): blocks are taken on demand as a request grows; full blocks are hashed
  and cached for later requests (prefix caching), free cached blocks are evicted LRU.
- "contiguous": a request's first allocation reserves ceil(max_model_len / block_size) blocks
  at once, as transformers' static cache does; a request is admitted only if its whole
  reservation fits. No prefix caching, no sliding window.
- "none": no KV cache at all (the no-cache baseline): every allocation succeeds with no blocks.

Block 0 is the null block (see `block_pool`): usable block ids start at 1, and a block table
entry `NULL_BLOCK_ID` marks a block the sliding window has dropped. The table keeps its length,
so position p of a request always lives in block_table[p // block_size]:

    sliding_window W, num_computed_tokens nc (the next query position):
    positions   0 ........ nc-W-1 | nc-W ........ nc-1 | nc ... (this step)
    table       [ 0    0    0     | 5     9    12      | 14 ]
                  dropped: freed,   kept: every position >= nc - W, rounded down to a block
                  never read again

The kept range holds one token more than a window of W keys ending at the query needs, so it
is safe whether or not the attention counts the query itself in the window. A request holds
at most ceil((W + block_size - 1 + num_new_tokens) / block_size) real blocks: O(window).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import NamedTuple

from kvserve.config import CACHE_MODES
from kvserve.kv.block import KVBlock, require
from kvserve.kv.block_hash import ExtraKey, extend_block_hashes
from kvserve.kv.block_pool import BlockPool
from kvserve.kv.eviction import NextUse
from kvserve.request import Request


class PrefixCacheStats(NamedTuple):
    """Cumulative prefix-cache counters (Prometheus counters take differences)."""

    queries: int  # tokens looked up, once per request admission
    hits: int  # of those, tokens found in the cache
    evictions: int  # cached blocks whose hash was dropped to reuse the block


class KVCacheManager:
    """Owns the block pool and every request's block table.

    Args:
        num_blocks: physical blocks, including the null block 0 (ignored when cache_mode is
            "none", where it may be 0).
        block_size: tokens per block.
        enable_prefix_caching: reuse cached full blocks across requests ("paged" only).
        cache_mode: "paged", "contiguous" or "none".
        max_model_len: longest prompt + output of one request.
        hash_extra_keys: what besides the tokens decides a block's K/V (model fingerprint, kv
            dtype); part of every block hash.
        sliding_window: drop blocks older than the window ("paged" only).
        eviction_policy, next_use, on_evict: the pool's eviction order and hooks (see
            `BlockPool`); the engine uses "lru", the trace simulator all of them.

    Raises:
        ValueError: an argument is out of range (the message names it).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        cache_mode: str = "paged",
        max_model_len: int,
        hash_extra_keys: tuple[ExtraKey, ...] = (),
        sliding_window: int | None = None,
        eviction_policy: str = "lru",
        next_use: NextUse | None = None,
        on_evict: Callable[[bytes], None] | None = None,
    ) -> None:
        if cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode: must be one of {CACHE_MODES}, got {cache_mode!r}")
        for name, value in (("block_size", block_size), ("max_model_len", max_model_len)):
            if value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window: must be >= 1, got {sliding_window}")
        self.block_size = block_size
        self.cache_mode = cache_mode
        self.max_model_len = max_model_len
        self.hash_extra_keys = hash_extra_keys
        self.enable_prefix_caching = enable_prefix_caching and cache_mode == "paged"
        self.sliding_window = sliding_window if cache_mode == "paged" else None
        self.num_blocks = 0 if cache_mode == "none" else num_blocks
        # "none" keeps a pool of just the null block: nothing to hand out, usage 0.
        self.pool = BlockPool(
            num_blocks if self.caches_kv else 1, eviction_policy, next_use, on_evict
        )
        self.num_reserved_blocks = -(-max_model_len // block_size)
        self._tables: dict[str, list[KVBlock]] = {}
        self._num_cached_blocks: dict[str, int] = {}
        self._block_copies: list[tuple[int, int]] = []
        self._num_queries = 0
        self._num_hits = 0

    @property
    def caches_kv(self) -> bool:
        """False for cache_mode "none": every step must recompute the whole sequence."""
        return self.cache_mode != "none"

    @property
    def num_usable_blocks(self) -> int:
        """Blocks requests can hold: all but the null block (0 for cache_mode "none")."""
        return self.pool.num_usable_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one request."""
        return self.pool.num_usable_blocks - self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests, in [0, 1]."""
        return self.pool.usage

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._num_queries, self._num_hits, self.pool.num_evictions)

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table as ids ([] for an unknown request or cache_mode "none")."""
        return [block.block_id for block in self._tables.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of a request not yet allocated. No side effects on blocks.

        Extends `request.block_hashes` first. At most `request.max_prefix_hit_tokens` tokens
        count: `num_tokens - 1`, because the last token is always recomputed for its logits,
        so a block-aligned prompt that is fully cached misses its last block:

            prompt (block_size 4):  [ a b c d | e f g h ]   both blocks cached
            hit:                    [ a b c d ]              4 tokens, not 8

        and fewer for a request with `prompt_logprobs` (none before its prompt is scored). Its
        blocks are still registered as it computes them: where the same prefix is already
        cached, the existing block keeps the hash and the new one stays a plain block (see
        `BlockPool.cache_full_blocks`).

        Returns:
            (the cached blocks, in table order; their number of tokens). ([], 0) when prefix
            caching is off or cache_mode is not "paged".
        """
        if not self.enable_prefix_caching:
            return [], 0
        hashes = extend_block_hashes(request, self.block_size, self.hash_extra_keys)
        max_num_blocks = request.max_prefix_hit_tokens // self.block_size
        blocks: list[KVBlock] = []
        for block_hash in hashes[:max_num_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[KVBlock] = ()
    ) -> list[int] | None:
        """Make room for this step's tokens; all or nothing.

        new_computed_blocks (the prefix hit from `get_computed_blocks`, first allocation only)
        go at the head of the table and count as computed:

            [ request.num_computed_tokens | new_computed_blocks | num_new_tokens ]
            0                             nc                    nc + num_new_tokens = total

        Blocks are taken for positions < total, a shared block about to be written is copied
        (see `take_block_copies`), blocks the sliding window dropped are freed, and the full
        blocks of all_token_ids[:total] are registered in the prefix cache. They are registered
        before the forward that fills them, so a request admitted later in the same step may
        hit them: the runner must write every scheduled token's K/V of a layer before any
        attention of that layer reads (one flat batch does; per-request forwards reordered
        "decodes first" would not).

        Returns:
            The request's whole block table as ids, or None (and nothing changed) if not
            enough blocks are free. Always [] when cache_mode is "none".

        Raises:
            ValueError: num_new_tokens < 0, total > max_model_len, or new_computed_blocks
                passed for a request that already has blocks.
        """
        table = self._tables.get(request.request_id)
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_total = num_computed + num_new_tokens
        if table is not None and new_computed_blocks:
            raise ValueError(f"prefix-hit blocks passed to {request} that already has blocks")
        if num_new_tokens < 0 or num_total > self.max_model_len:
            raise ValueError(f"cannot allocate {num_new_tokens} more tokens for {request}")
        if self.cache_mode == "none":
            self._tables[request.request_id] = []
            return []
        is_first = table is None
        # Nothing below mutates `table` until the request is known to fit.
        table = [*new_computed_blocks] if table is None else table
        num_existing = len(table) - len(new_computed_blocks)
        num_dropped, dropped = self._dropped(table, num_computed)
        written_shared = self._written_shared_indices(table, num_computed, num_total)
        num_missing = max(0, self._num_required_blocks(num_total) - len(table))
        num_available = self._num_available(table, num_existing, dropped, num_dropped)
        if num_missing + len(written_shared) > num_available:
            return None

        self._drop(table, dropped, num_existing)
        self.pool.touch(table[max(num_existing, num_dropped) :])
        self._copy_on_write(table, written_shared, num_computed)
        table.extend(self.pool.get_new_blocks(num_missing))
        self._tables[request.request_id] = table
        if is_first and self.enable_prefix_caching:
            self._num_queries += request.num_tokens
            self._num_hits += len(new_computed_blocks) * self.block_size
        self._cache_full_blocks(request, table, num_total)
        return [block.block_id for block in table]

    def free(self, request: Request) -> None:
        """Release all the request's blocks and forget it; a no-op for an unknown request.

        Blocks are freed tail first, so the tail (least likely to be shared) is evicted before
        the prefix. Freed blocks keep their hashes: a later request may still hit them.
        """
        table = self._tables.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if table:
            self.pool.free_blocks(reversed(table))

    def fork(self, parent: Request, child: Request) -> None:
        """Give `child` the parent's block table, sharing every block (ref_cnt += 1).

        Neither request copies anything now: the first `allocate_slots` that writes into a
        shared block (the partial last block) replaces it by a fresh copy in that request's
        table. Full shared blocks are never written again. Takes no free block, never fails
        for lack of memory.

        Raises:
            ValueError: the parent has no table, or the child already has one.
        """
        if parent.request_id not in self._tables or child.request_id in self._tables:
            raise ValueError(f"cannot fork {parent} into {child}")
        table = list(self._tables[parent.request_id])
        self.pool.touch(table)
        self._tables[child.request_id] = table
        self._num_cached_blocks[child.request_id] = self._num_cached_blocks.get(
            parent.request_id, 0
        )

    def take_block_copies(self) -> list[tuple[int, int]]:
        """(src_block_id, dst_block_id) pairs the runner must copy before the next forward.

        Returns the pairs recorded by copy-on-write since the last call, and clears them.
        """
        copies, self._block_copies = self._block_copies, []
        return copies

    def reset_prefix_cache(self) -> bool:
        """Forget all cached hashes. Returns False (nothing changed) if a block is in use."""
        return self.pool.reset_prefix_cache()

    def check_invariants(self) -> None:
        """Raise AssertionError if the tables and the pool disagree.

        Beyond the pool's own checks: each block's ref_cnt equals the number of tables holding
        it, dropped (null) entries only form a table's head, contiguous tables have the full
        reservation, and no request has more cached blocks than blocks.
        """
        self.pool.check_invariants()
        null = self.pool.null_block
        holders: Counter[int] = Counter()
        for request_id, table in self._tables.items():
            num_null = sum(1 for b in table if b is null)
            require(all(b is null for b in table[:num_null]), f"{request_id}: null inside")
            require(all(self.pool.blocks[b.block_id] is b for b in table), "foreign block")
            holders.update(b.block_id for b in table[num_null:])
            num_cached = self._num_cached_blocks.get(request_id, 0)
            require(num_cached <= len(table), f"{request_id}: {num_cached} cached blocks")
            if self.cache_mode == "contiguous":
                require(len(table) == self.num_reserved_blocks, f"{request_id}: reservation")
        for block in self.pool.blocks[1:]:
            expected = holders[block.block_id]
            require(block.ref_cnt == expected, f"{block} is held by {expected} tables")

    def _num_required_blocks(self, num_total: int) -> int:
        if self.cache_mode == "contiguous":
            return self.num_reserved_blocks
        return -(-num_total // self.block_size)

    def _dropped(self, table: list[KVBlock], num_computed: int) -> tuple[int, list[int]]:
        """Where the kept part of the table starts, and the real blocks newly dropped before it.

        Every position < num_computed - sliding_window is dropped, in whole blocks; earlier
        drops are already null (nulls only form the table's head):

            positions  [ 0 .. bs-1 | bs .. 2bs-1 | 2bs .. ]    num_computed - W = bs + 3
            table      [   null    | kept: it holds position bs + 3 ...
        """
        if self.sliding_window is None:
            return 0, []
        num_computed_old = max(0, num_computed - self.sliding_window)
        num_dropped = min(len(table), num_computed_old // self.block_size)
        first = num_dropped
        while first > 0 and table[first - 1] is not self.pool.null_block:
            first -= 1
        return num_dropped, list(range(first, num_dropped))

    def _num_available(
        self, table: list[KVBlock], num_existing: int, dropped: list[int], num_dropped: int
    ) -> int:
        """Free blocks once prefix-hit blocks are touched and dropped blocks released.

        Touching a free cached block takes it out of the free pool; dropping the last
        reference to a block puts it back. Prefix-hit blocks the window drops are never
        touched.
        """
        null = self.pool.null_block
        revived = table[max(num_existing, num_dropped) :]
        num_revived = sum(1 for b in revived if b.ref_cnt == 0 and b is not null)
        num_released = sum(1 for i in dropped if i < num_existing and table[i].ref_cnt == 1)
        return self.num_free_blocks - num_revived + num_released

    def _written_shared_indices(
        self, table: list[KVBlock], num_computed: int, num_total: int
    ) -> list[int]:
        """Indices of blocks this step writes into that another table also holds."""
        first = num_computed // self.block_size
        end = min(len(table), -(-num_total // self.block_size))
        return [i for i in range(first, end) if table[i].ref_cnt > 1]

    def _drop(self, table: list[KVBlock], dropped: list[int], num_existing: int) -> None:
        """Replace dropped blocks by the null block; release those this request held."""
        released = [table[i] for i in dropped if i < num_existing]
        for i in dropped:
            table[i] = self.pool.null_block
        self.pool.free_blocks(reversed(released))

    def _copy_on_write(self, table: list[KVBlock], indices: list[int], num_computed: int) -> None:
        """Give this request private copies of the shared blocks at `indices`."""
        for i in indices:
            shared = table[i]
            (table[i],) = self.pool.get_new_blocks(1)
            self.pool.free_blocks([shared])
            if i * self.block_size < num_computed:  # it holds tokens: the runner copies them
                self._block_copies.append((shared.block_id, table[i].block_id))

    def _cache_full_blocks(self, request: Request, table: list[KVBlock], num_total: int) -> None:
        """Register the blocks that are full within all_token_ids[:num_total]."""
        if not self.enable_prefix_caching:
            return
        num_full = min(num_total, request.num_tokens) // self.block_size
        start = self._num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = extend_block_hashes(request, self.block_size, self.hash_extra_keys)
        null = self.pool.null_block
        pairs = [(table[i], hashes[i]) for i in range(start, num_full) if table[i] is not null]
        self.pool.cache_full_blocks([b for b, _ in pairs], [h for _, h in pairs])
        self._num_cached_blocks[request.request_id] = num_full
