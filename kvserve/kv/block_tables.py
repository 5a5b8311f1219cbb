"""The consistency check of the KV cache manager's block tables against the pool (tests and
`check_invariants` call it after every step)."""

from __future__ import annotations

from collections import Counter

from kvserve.kv.block import KVBlock, require
from kvserve.kv.block_pool import BlockPool


def check_block_tables(
    pool: BlockPool, tables: dict[str, list[KVBlock]], num_reserved: int | None
) -> None:
    """Raise AssertionError if the tables and the pool disagree: beyond the pool's own checks,
    each block's ref_cnt equals the number of tables holding it, dropped (null) entries only
    form a table's head, and with `num_reserved` (contiguous mode) every table has exactly
    that many blocks."""
    pool.check_invariants()
    null = pool.null_block
    holders: Counter[int] = Counter()
    for request_id, table in tables.items():
        num_null = sum(1 for b in table if b is null)
        require(all(b is null for b in table[:num_null]), f"{request_id}: null inside")
        require(all(pool.blocks[b.block_id] is b for b in table), "foreign block")
        holders.update(b.block_id for b in table[num_null:])
        if num_reserved is not None:
            require(len(table) == num_reserved, f"{request_id}: reservation")
    for block in pool.blocks[1:]:
        expected = holders[block.block_id]
        require(block.ref_cnt == expected, f"{block} is held by {expected} tables")
