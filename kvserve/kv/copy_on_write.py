"""Copy-on-write of shared blocks: a block two tables hold is copied before one writes it.

Forks (`n > 1`, beam search) share every block of the parent. Full blocks are never written
again, so only the partial last block is ever copied, by the first request to write into it:

    parent table  [ 1 2 ]  child table [ 1 2 ]     block 2 holds positions 4..5 of 8
    parent writes position 6:  parent [ 1 3 ], child [ 1 2 ], copy (2 -> 3) before the forward
"""

from __future__ import annotations

from kvserve.kv.block import KVBlock
from kvserve.kv.block_pool import BlockPool


class CopyOnWrite:
    """Finds the shared blocks a step writes, swaps in private copies, records the copies.

    Args:
        block_size: tokens per block.
        pool: where the copies come from and the shared blocks' references go back.
    """

    def __init__(self, block_size: int, pool: BlockPool) -> None:
        self.block_size = block_size
        self.pool = pool
        self._copies: list[tuple[int, int]] = []

    def get_written_shared(
        self, table: list[KVBlock], num_computed: int, num_total: int
    ) -> list[int]:
        """Indices of the blocks positions [num_computed, num_total) write into that another
        table also holds. No side effects."""
        first = num_computed // self.block_size
        end = min(len(table), -(-num_total // self.block_size))
        return [i for i in range(first, end) if table[i].ref_cnt > 1]

    def copy(self, table: list[KVBlock], indices: list[int], num_computed: int) -> None:
        """Give the table private copies of the shared blocks at `indices` (one free block
        each: callers check first). A copy of a block holding tokens is recorded."""
        for i in indices:
            shared = table[i]
            (table[i],) = self.pool.get_new_blocks(1)
            self.pool.free_blocks([shared])
            if i * self.block_size < num_computed:  # it holds tokens: the runner copies them
                self._copies.append((shared.block_id, table[i].block_id))

    def take_copies(self) -> list[tuple[int, int]]:
        """(src_block_id, dst_block_id) pairs recorded since the last call; clears them."""
        copies, self._copies = self._copies, []
        return copies
