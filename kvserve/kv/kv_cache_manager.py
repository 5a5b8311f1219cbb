"""The scheduler's only interface to KV memory: block tables, prefix hits, copy-on-write.

Cache modes (`cache_mode`):
- "paged" (default): blocks are taken on demand as a request grows; full blocks are hashed
  and cached for later requests (prefix caching), free cached blocks are evicted LRU.
- "contiguous": a request's first allocation reserves ceil(max_model_len / block_size) blocks
  at once, as transformers' static cache does; a request is admitted only if its whole
  reservation fits. No prefix caching, no sliding window.
- "none": no KV cache at all (the no-cache baseline): every allocation succeeds with no blocks.

Block 0 is the null block (`block_pool`); a sliding window (`sliding_window`) drops old
blocks; a full block becomes hittable once the step that writes it has run (`prefix_cache`).
Block hashes are computed whether prefix caching is on or off.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvserve.config import CACHE_MODES
from kvserve.kv.block import KVBlock
from kvserve.kv.block_hash import ExtraKey, extend_block_hashes
from kvserve.kv.block_pool import BlockPool
from kvserve.kv.block_tables import check_block_tables
from kvserve.kv.copy_on_write import CopyOnWrite
from kvserve.kv.eviction import NextUse
from kvserve.kv.kv_events import KVEvent
from kvserve.kv.kv_transfer import BlockTransfer, ExternalBlocks, blocks_to_swap_out
from kvserve.kv.prefix_cache import ComputedBlocks, PrefixCache, PrefixCacheStats
from kvserve.kv.sliding_window import Dropped, SlidingWindow
from kvserve.request import Request


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
        eviction_policy, next_use, enable_kv_events: the pool's eviction order and events
            (see `BlockPool`); the engine uses "lru", the trace simulator all of them.
        connector: the scheduler half of a KV connector: continues prefix hits outside the
            pool and asks for saves (None: no tier, nothing is loaded or saved).

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
        enable_kv_events: bool = False,
        connector: ExternalBlocks | None = None,
    ) -> None:
        if cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode: must be one of {CACHE_MODES}, got {cache_mode!r}")
        for name, value in (("block_size", block_size), ("max_model_len", max_model_len)):
            if value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        self.block_size = block_size
        self.cache_mode = cache_mode
        self.max_model_len = max_model_len
        self.hash_extra_keys = hash_extra_keys
        self.enable_prefix_caching = enable_prefix_caching and cache_mode == "paged"
        self.num_blocks = 0 if cache_mode == "none" else num_blocks
        # "none" keeps a pool of just the null block: nothing to hand out, usage 0.
        self.pool = BlockPool(
            num_blocks if self.caches_kv else 1, eviction_policy, next_use, enable_kv_events
        )
        windowed = sliding_window if cache_mode == "paged" else None
        self.window = SlidingWindow(windowed, block_size, self.pool)
        self.num_reserved_blocks = -(-max_model_len // block_size)
        self._tables: dict[str, list[KVBlock]] = {}
        self.connector = connector if self.caches_kv else None
        self.prefix_cache = PrefixCache(self.pool, self.enable_prefix_caching, self.connector)
        self._copy_on_write = CopyOnWrite(block_size, self.pool)

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
        return self.prefix_cache.stats

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table as ids ([] for an unknown request or cache_mode "none")."""
        return [block.block_id for block in self._tables.get(request_id, ())]

    def block_tables(self) -> dict[str, list[int]]:
        """Every request's block table as ids, null entries included (a copy)."""
        return {rid: [block.block_id for block in t] for rid, t in self._tables.items()}

    def get_computed_blocks(self, request: Request) -> tuple[ComputedBlocks, int]:
        """The longest cached prefix of a request not yet allocated. No side effects on blocks.

        Extends `request.block_hashes` first. At most `request.max_prefix_hit_tokens` tokens
        count: `num_tokens - 1`, because the last token is always recomputed for its logits,
        so a block-aligned prompt that is fully cached misses its last block:

            prompt (block_size 4):  [ a b c d | e f g h ]   both blocks cached
            hit:                    [ a b c d ]              4 tokens, not 8

        and fewer for a request with `prompt_logprobs` (none before its prompt is scored).
        The connector (no sliding window) may continue the pool's hit: `external_hashes`.

        Returns:
            (the hit, its tokens, loadable ones included). ([], 0) when prefix caching is off
            or cache_mode is not "paged".
        """
        hashes = extend_block_hashes(request, self.block_size, self.hash_extra_keys)
        max_num_blocks = request.max_prefix_hit_tokens // self.block_size
        hit = self.prefix_cache.get_hit(hashes[:max_num_blocks], self.window.window is None)
        return hit, (len(hit) + len(hit.external_hashes)) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[KVBlock] = ()
    ) -> list[int] | None:
        """Make room for this step's tokens; all or nothing.

        new_computed_blocks (the prefix hit from `get_computed_blocks`, first allocation only)
        go at the head of the table and count as computed, followed by fresh blocks for the
        hit's `external_hashes`, which the step loads (`take_blocks_to_load`):

            [ request.num_computed_tokens | new_computed_blocks | num_new_tokens ]
            0                             nc                    nc + num_new_tokens = total

        Blocks are taken for positions < total, a shared block about to be written is copied
        (`take_block_copies`), blocks the sliding window dropped are freed, and the full
        blocks the step writes are registered in the prefix cache now (a request admitted
        later in this step may hit them: the runner writes every scheduled token's K/V of a
        layer before any attention of that layer reads) and announced by `commit_step`
        (saved through `take_blocks_to_save`).

        Returns:
            The request's whole block table as ids, or None (and nothing changed) if not
            enough blocks are free. Always [] when cache_mode is "none".

        Raises:
            ValueError: num_new_tokens < 0, total > max_model_len, or new_computed_blocks
                passed for a request that already has blocks.
        """
        table = self._tables.get(request.request_id)
        hit = new_computed_blocks
        external = hit.external_hashes if isinstance(hit, ComputedBlocks) else []
        num_hit_blocks = len(new_computed_blocks) + len(external)
        num_computed = request.num_computed_tokens + num_hit_blocks * self.block_size
        num_total = num_computed + num_new_tokens
        if table is not None and num_hit_blocks:
            raise ValueError(f"prefix-hit blocks passed to {request} that already has blocks")
        if num_new_tokens < 0 or num_total > self.max_model_len:
            raise ValueError(f"cannot allocate {num_new_tokens} more tokens for {request}")
        hashes = extend_block_hashes(request, self.block_size, self.hash_extra_keys)
        if self.cache_mode == "none":
            self._tables[request.request_id] = []
            return []
        is_first = table is None
        # Nothing below mutates `table` until the request is known to fit.
        table = [*new_computed_blocks] if table is None else table
        num_held = len(table) - len(new_computed_blocks)
        dropped = self.window.get_dropped(table, num_computed)
        written_shared = self._copy_on_write.get_written_shared(table, num_computed, num_total)
        num_missing = max(0, self._num_required_blocks(num_total) - len(table))
        if num_missing + len(written_shared) > self._num_available(table, num_held, dropped):
            return None

        self.window.drop(table, dropped, num_held)
        self.pool.touch(table[max(num_held, dropped.num_dropped) :])
        self._copy_on_write.copy(table, written_shared, num_computed)
        table.extend(self.pool.get_new_blocks(num_missing))
        self._tables[request.request_id] = table
        if is_first and self.enable_prefix_caching:
            self.prefix_cache.num_queries += request.num_tokens
            self.prefix_cache.num_hits += len(new_computed_blocks) * self.block_size
        first = num_computed // self.block_size - len(external)  # first block written
        end = min(num_total, request.num_tokens) // self.block_size  # blocks full after
        self.prefix_cache.record_step(
            request.request_id, table[first:end], hashes[first:end], len(external)
        )
        return [block.block_id for block in table]

    def commit_step(self) -> None:
        """The scheduled step ran: announce the full blocks it registered (`BlockStored`
        events). They were hittable since `allocate_slots`; a listener learns of them only
        now, once their K/V are written."""
        self.prefix_cache.commit_step()

    def take_blocks_to_load(self) -> list[BlockTransfer]:
        """Blocks to fill from the connector before the next forward; clears them."""
        return self.prefix_cache.take_loads()

    def take_blocks_to_save(self) -> list[BlockTransfer]:
        """Full blocks the next forward writes, to save after it; clears them."""
        return self.prefix_cache.take_saves()

    def take_events(self) -> list[KVEvent]:
        """The pool's stored / removed events since the last call (see `kv_events`)."""
        return self.pool.take_events()

    def get_blocks_to_swap_out(self, request: Request) -> list[BlockTransfer]:
        """The request's computed full blocks the connector does not hold yet (see
        `kv_transfer.blocks_to_swap_out`). No side effects."""
        if self.connector is None or self.window.window is not None:
            return []  # a window's dropped blocks are null, and its hits never reach a tier
        table = self._tables.get(request.request_id, [])
        return blocks_to_swap_out(table, request, self.block_size, self.connector)

    def free(self, request: Request) -> None:
        """Release all the request's blocks and forget it; a no-op for an unknown request.

        Blocks are freed tail first, so the tail (least likely to be shared) is evicted before
        the prefix. Freed blocks keep their hashes: a later request may still hit them. What
        a step not yet run would have written for it is forgotten.
        """
        table = self._tables.pop(request.request_id, None)
        self.prefix_cache.forget(request.request_id)
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

    def take_block_copies(self) -> list[tuple[int, int]]:
        """(src_block_id, dst_block_id) pairs to copy before the next forward; clears them."""
        return self._copy_on_write.take_copies()

    def reset_prefix_cache(self) -> bool:
        """Forget all cached hashes. Returns False (nothing changed) if a block is in use."""
        return self.pool.reset_prefix_cache()

    def check_invariants(self) -> None:
        """Raise AssertionError if the tables and the pool disagree: beyond the pool's own
        checks, each block's ref_cnt equals the number of tables holding it, dropped (null)
        entries only form a table's head, contiguous tables have the full reservation."""
        reserved = self.num_reserved_blocks if self.cache_mode == "contiguous" else None
        check_block_tables(self.pool, self._tables, reserved)

    def _num_required_blocks(self, num_total: int) -> int:
        if self.cache_mode == "contiguous":
            return self.num_reserved_blocks
        return -(-num_total // self.block_size)

    def _num_available(self, table: list[KVBlock], num_held: int, dropped: Dropped) -> int:
        """Free blocks once prefix-hit blocks are touched (a free cached block leaves the free
        pool) and dropped blocks released; hit blocks the window drops are never touched."""
        null = self.pool.null_block
        revived = table[max(num_held, dropped.num_dropped) :]
        num_revived = sum(1 for b in revived if b.ref_cnt == 0 and b is not null)
        num_released = self.window.num_released(table, dropped, num_held)
        return self.num_free_blocks - num_revived + num_released
