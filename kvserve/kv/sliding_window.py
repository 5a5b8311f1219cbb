"""Sliding-window attention (Mistral): blocks older than the window are dropped and freed.

A block table entry `NULL_BLOCK_ID` marks a block the window has dropped. The table keeps its
length, so position p of a request always lives in block_table[p // block_size]:

    sliding_window W, num_computed_tokens nc (the next query position):
    positions   0 ........ nc-W-1 | nc-W ........ nc-1 | nc ... (this step)
    table       [ 0    0    0     | 5     9    12      | 14 ]
                  dropped: freed,   kept: every position >= nc - W, rounded down to a block
                  never read again

The kept range holds one token more than a window of W keys ending at the query needs, so it
is safe whether or not the attention counts the query itself in the window. A request holds
at most ceil((W + block_size - 1 + num_new_tokens) / block_size) real blocks: O(window).
Dropped entries only ever form the head of a table.
"""

from __future__ import annotations

from typing import NamedTuple

from kvserve.kv.block import KVBlock
from kvserve.kv.block_pool import BlockPool


class Dropped(NamedTuple):
    """Where the kept part of a table starts, and the real blocks newly dropped before it."""

    num_dropped: int  # table entries before the kept part (null now or after the drop)
    indices: list[int]  # entries still holding a real block that the drop replaces by null


NOTHING_DROPPED = Dropped(0, [])


class SlidingWindow:
    """Drops the blocks of one request's table that fall out of the window.

    Args:
        window: attention window in tokens, >= 1; None for full attention (nothing drops).
        block_size: tokens per block.
        pool: the pool the dropped blocks go back to.

    Raises:
        ValueError: window < 1.
    """

    def __init__(self, window: int | None, block_size: int, pool: BlockPool) -> None:
        if window is not None and window < 1:
            raise ValueError(f"sliding_window: must be >= 1, got {window}")
        self.window = window
        self.block_size = block_size
        self.pool = pool

    def get_dropped(self, table: list[KVBlock], num_computed: int) -> Dropped:
        """The entries to drop before a step starting at `num_computed`. No side effects.

        Every position < num_computed - window is dropped, in whole blocks; earlier drops
        are already null:

            positions  [ 0 .. bs-1 | bs .. 2bs-1 | 2bs .. ]    num_computed - W = bs + 3
            table      [   null    | kept: it holds position bs + 3 ...
        """
        if self.window is None:
            return NOTHING_DROPPED
        num_old = max(0, num_computed - self.window)
        num_dropped = min(len(table), num_old // self.block_size)
        first = num_dropped
        while first > 0 and table[first - 1] is not self.pool.null_block:
            first -= 1
        return Dropped(num_dropped, list(range(first, num_dropped)))

    def num_released(self, table: list[KVBlock], dropped: Dropped, num_held: int) -> int:
        """Blocks the drop returns to the free pool: the request's last reference to them.

        Only the first `num_held` entries are the request's already (the rest are a prefix
        hit not yet touched, which a drop never touches).
        """
        return sum(1 for i in dropped.indices if i < num_held and table[i].ref_cnt == 1)

    def drop(self, table: list[KVBlock], dropped: Dropped, num_held: int) -> None:
        """Replace the dropped entries by the null block; free those the request held.

        Freed blocks keep their hashes (tail first, as `KVCacheManager.free` does): a later
        request with the same prefix may still hit them.
        """
        released = [table[i] for i in dropped.indices if i < num_held]
        for i in dropped.indices:
            table[i] = self.pool.null_block
        self.pool.free_blocks(reversed(released))
