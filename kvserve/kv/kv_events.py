"""What the block pool tells listeners about its prefix cache: blocks stored and removed.

A router that sends requests to the replica holding their prefix keeps, per replica, the set
of block hashes it holds: add on `BlockStored`, discard on `BlockRemoved`, clear on
`AllBlocksCleared`. Events are recorded in order in a list that the listener takes
(`KVCacheManager.take_events`) between steps; nothing calls out of the pool mid-step.

    step N:  schedule (allocate)  ->  forward writes K/V  ->  commit: BlockStored(h)
    later:   a request takes the free block that held h     ->  BlockRemoved(h)

A block is stored only once its K/V are written: a hash in the set is always readable.
"""

from __future__ import annotations

from typing import NamedTuple


class BlockStored(NamedTuple):
    """A full block's K/V are written and registered under its hash (it may be hit now)."""

    block_hash: bytes
    block_id: int


class BlockRemoved(NamedTuple):
    """A cached block lost its hash: it is being reused for other tokens (an eviction)."""

    block_hash: bytes
    block_id: int


class AllBlocksCleared(NamedTuple):
    """Every hash was forgotten (`reset_prefix_cache`)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
