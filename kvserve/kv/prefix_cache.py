"""Prefix caching for `KVCacheManager`: hit lookup, the blocks a step writes, their events.

A full block is registered in the pool's cached map when its step is scheduled
(`record_step`), so a request admitted later in the same step may hit it: one flat forward
writes every scheduled token's K/V of a layer before any attention of that layer reads. It is
announced (`BlockStored`, and saved through the connector) only once the step has run
(`commit_step`), so a hash a listener learns is always readable:

    step N   schedule:  allocate a -> register (block 7, h3)     a later request may hit h3
             execute:   forward writes block 7, then saves it
             update:    commit -> BlockStored(h3, 7)
    step N+1 a router or tier that learned h3 can read block 7

With a connector (`kv_transfer.ExternalBlocks`), a hit continues past the pool into the
blocks the connector can load, and newly computed full blocks are saved when it asks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from kvserve.kv.block import KVBlock
from kvserve.kv.block_pool import BlockPool
from kvserve.kv.kv_transfer import BlockTransfer, ExternalBlocks


class PrefixCacheStats(NamedTuple):
    """Cumulative prefix-cache counters (Prometheus counters take differences)."""

    queries: int  # tokens looked up, once per request admission
    hits: int  # of those, tokens found in the cache
    evictions: int  # cached blocks whose hash was dropped to reuse the block


class ComputedBlocks(list[KVBlock]):
    """A prefix hit (`KVCacheManager.get_computed_blocks`): the pool's cached blocks in table
    order (the list itself), and the hashes of the blocks right after them that the
    connector can load (`external_hashes`, from the places `external_tiers` counts);
    `allocate_slots` gives those fresh blocks."""

    def __init__(
        self,
        blocks: Iterable[KVBlock] = (),
        external_hashes: Sequence[bytes] = (),
        external_tiers: dict[str, int] | None = None,
    ) -> None:
        super().__init__(blocks)
        self.external_hashes = list(external_hashes)
        self.external_tiers = external_tiers or {}  # place (tier name) -> blocks

    def num_tokens_by_tier(self, block_size: int) -> dict[str, int]:
        """The hit's tokens per place: "pool", then each tier; only places with tokens."""
        blocks = {"pool": len(self), **self.external_tiers}
        return {tier: num * block_size for tier, num in blocks.items() if num}


class PrefixCache:
    """Looks up prefix hits and keeps the written blocks of the step being scheduled.

    Args:
        pool: the block pool whose cached map holds the hits.
        enabled: prefix caching on (hits and commits); off, only saves are recorded.
        connector: the scheduler half of a KV connector, or None (no tier).
    """

    def __init__(self, pool: BlockPool, enabled: bool, connector: ExternalBlocks | None) -> None:
        self.pool = pool
        self.enabled = enabled
        self.connector = connector
        self.saves_blocks = connector is not None and connector.saves_blocks
        self.num_queries = 0
        self.num_hits = 0
        self._written: dict[str, list[KVBlock]] = {}  # registered, announced at commit
        self._loads: dict[str, list[BlockTransfer]] = {}
        self._saves: dict[str, list[BlockTransfer]] = {}

    @property
    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self.num_queries, self.num_hits, self.pool.num_evictions)

    def get_hit(self, block_hashes: Sequence[bytes], external: bool) -> ComputedBlocks:
        """The pool's longest run of cached blocks for `block_hashes`, then (when `external`)
        the connector's run after it. No side effects."""
        if not self.enabled:
            return ComputedBlocks()
        blocks: list[KVBlock] = []
        for block_hash in block_hashes:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        rest = block_hashes[len(blocks) :]
        if not external or self.connector is None or not rest:
            return ComputedBlocks(blocks)
        loadable = rest[: self.connector.num_external_hit_blocks(rest)]
        return ComputedBlocks(blocks, loadable, self.connector.get_hit_tiers(loadable))

    def record_step(
        self,
        request_id: str,
        blocks: Sequence[KVBlock],
        block_hashes: Sequence[bytes],
        num_loaded: int,
    ) -> None:
        """Record the full blocks one request's step fills, in table order, with their hashes:
        the first `num_loaded` come from the connector, the rest are computed by the forward
        (and saved after it when the connector saves). Once a step per request.

            table   [ ... earlier steps | loaded (num_loaded) | computed, full ]
                                          loads                 saves
        """
        if not (self.enabled or self.saves_blocks):
            return
        pairs = list(zip(blocks, block_hashes, strict=True))
        if pairs and self.enabled:
            registered = self.pool.cache_full_blocks(blocks, block_hashes)
            if registered:
                self._written[request_id] = registered
        if num_loaded:
            self._loads[request_id] = [BlockTransfer(b.block_id, h) for b, h in pairs[:num_loaded]]
        if self.saves_blocks and len(pairs) > num_loaded:
            self._saves[request_id] = [BlockTransfer(b.block_id, h) for b, h in pairs[num_loaded:]]

    def forget(self, request_id: str) -> None:
        """The request was freed before its step ran: its blocks will not be written, so
        what it registered is dropped and nothing of it is loaded, saved or announced."""
        self.pool.uncache_blocks(self._written.pop(request_id, []))
        self._loads.pop(request_id, None)
        self._saves.pop(request_id, None)

    def commit_step(self) -> None:
        """The step ran: announce every block it registered (`BlockStored` events)."""
        written, self._written = self._written, {}
        for blocks in written.values():
            self.pool.mark_stored(blocks)

    def take_loads(self) -> list[BlockTransfer]:
        """The step's loads, once per schedule; the connector keeps what they need."""
        loads, self._loads = self._loads, {}
        blocks = [load for items in loads.values() for load in items]
        if self.connector is not None:
            self.connector.prepare_loads(blocks)
        return blocks

    def take_saves(self) -> list[BlockTransfer]:
        saves, self._saves = self._saves, {}
        return [save for items in saves.values() for save in items]
