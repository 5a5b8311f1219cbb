"""Blocks read and checked at lookup, kept until a step loads them (bounded by bytes).

A request found in the tiers but not admitted this step (the pool is full) is looked up again
in the next step; its blocks stay staged, so they are read and decoded once, not once per
step. A block's content is fixed by its hash, so a staged copy never goes stale. The oldest
staged blocks that no step loaded are let go when the bound is passed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from kvserve.kv.kv_cache import BlockData

DEFAULT_MAX_STAGED_BYTES = 256 << 20


class StagedBlock(NamedTuple):
    data: BlockData
    tier: str  # the store it was read from ("cpu", "disk", "redis")
    num_bytes: int


class StagedBlocks:
    """Staged blocks by hash, oldest first.

    Args:
        max_bytes: what blocks no step has loaded may hold; past it the oldest are dropped.

    Raises:
        ValueError: `max_bytes` negative.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_STAGED_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_staged_bytes: must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self._blocks: OrderedDict[bytes, StagedBlock] = OrderedDict()

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def tier_of(self, block_hash: bytes) -> str:
        return self._blocks[block_hash].tier

    def add(self, block_hash: bytes, data: BlockData, tier: str) -> None:
        """Stage a block just read (the newest)."""
        num_bytes = sum(
            t.numel() * t.element_size() for layer in data for t in layer if t is not None
        )
        self._blocks[block_hash] = StagedBlock(data, tier, num_bytes)
        self.num_bytes += num_bytes

    def touch(self, block_hash: bytes) -> None:
        """A lookup wanted it again: it is the newest now."""
        self._blocks.move_to_end(block_hash)

    def take(self, block_hashes: list[bytes]) -> dict[bytes, BlockData]:
        """Remove and return the blocks a step loads, then drop the oldest of the rest while
        they hold more than `max_bytes`.

        Raises:
            KeyError: a hash was not staged (the scheduler ordered a load no lookup counted).
        """
        taken = {block_hash: self._pop(block_hash) for block_hash in block_hashes}
        while self._blocks and self.num_bytes > self.max_bytes:
            self._pop(next(iter(self._blocks)))
        return taken

    def _pop(self, block_hash: bytes) -> BlockData:
        block = self._blocks.pop(block_hash)
        self.num_bytes -= block.num_bytes
        return block.data
