"""Eviction policies behind BlockPool: exact victims for fifo, lfu, belady; lru unchanged."""

from __future__ import annotations

import pytest

from kvserve.kv.block import KVBlock
from kvserve.kv.block_pool import BlockPool
from kvserve.kv.eviction import EVICTION_POLICIES, new_eviction_queue


def h(i: int) -> bytes:
    return bytes([i]) * 32


def fill(pool: BlockPool, count: int) -> list[KVBlock]:
    """Take `count` blocks and cache block k under h(k + 1), k = 0, 1, ..."""
    blocks = pool.get_new_blocks(count)
    pool.cache_full_blocks(blocks, [h(k + 1) for k in range(count)])
    return blocks


def evicted_hashes(pool: BlockPool, count: int) -> list[bytes]:
    """Hashes lost by taking `count` new blocks, in order."""
    lost: list[bytes] = []
    for _ in range(count):
        before = {b.block_id: b.block_hash for b in pool.blocks}
        (block,) = pool.get_new_blocks(1)
        assert before[block.block_id] is not None, "expected to evict a cached block"
        lost.append(before[block.block_id])  # type: ignore[arg-type]
    pool.check_invariants()
    return lost


def test_fifo_evicts_by_time_computed_however_often_hit() -> None:
    pool = BlockPool(4, "fifo")
    a, b, c = fill(pool, 3)
    pool.free_blocks([c, b, a])
    pool.touch([a])  # a hit on the oldest block does not save it under FIFO
    pool.free_blocks([a])
    pool.check_invariants()
    assert pool.free_block_ids() == [a.block_id, b.block_id, c.block_id]
    assert evicted_hashes(pool, 3) == [h(1), h(2), h(3)]


def test_lfu_evicts_least_hit_ties_least_recently_freed() -> None:
    pool = BlockPool(4, "lfu")
    a, b, c = fill(pool, 3)
    pool.free_blocks([c, b, a])  # all 0 hits; freed c, b, a
    pool.touch([a, a])  # two hits on a (a shared twice)
    pool.free_blocks([a, a])
    pool.touch([c])
    pool.free_blocks([c])
    # hits: a 2, b 0, c 1
    assert evicted_hashes(pool, 3) == [h(2), h(3), h(1)]


def test_lfu_count_restarts_when_the_block_is_refilled() -> None:
    pool = BlockPool(3, "lfu")
    a, b = fill(pool, 2)
    pool.touch([a])
    pool.free_blocks([a, a, b])
    (new,) = pool.get_new_blocks(1)  # evicts b (0 hits), refilled as h(9)
    assert new is b
    pool.cache_full_blocks([new], [h(9)])
    pool.free_blocks([new])
    # a has 1 hit from its old life, the refilled block 0: it goes first
    assert evicted_hashes(pool, 1) == [h(9)]


def test_belady_evicts_the_block_used_farthest_ahead_and_unused_first() -> None:
    future = {h(1): 10.0, h(2): 3.0, h(3): float("inf"), h(4): 7.0}
    pool = BlockPool(5, "belady", next_use=lambda key: future.get(key, float("inf")))
    blocks = fill(pool, 4)
    pool.free_blocks(blocks)
    assert evicted_hashes(pool, 4) == [h(3), h(1), h(4), h(2)]


def test_belady_refresh_reranks_a_free_block_whose_future_moved() -> None:
    future = {h(1): 5.0, h(2): 9.0}
    pool = BlockPool(3, "belady", next_use=lambda key: future[key])
    pool.free_blocks(fill(pool, 2))
    future[h(1)] = 20.0  # now used after h(2): it must go first
    pool.refresh_priority(h(1))
    assert pool.free_block_ids()[0] == 1
    assert evicted_hashes(pool, 2) == [h(1), h(2)]


@pytest.mark.parametrize("policy", ["fifo", "lfu", "belady"])
def test_unhashed_free_blocks_go_before_any_cached_block(policy: str) -> None:
    next_use = (lambda key: float("inf")) if policy == "belady" else None  # ties the plain
    pool = BlockPool(4, policy, next_use=next_use)
    cached = fill(pool, 2)
    plain = pool.get_new_blocks(1)  # never cached
    pool.free_blocks(cached + plain)  # the plain block is the most recently freed
    (first,) = pool.get_new_blocks(1)
    assert first is plain[0]
    assert pool.num_evictions == 0
    pool.check_invariants()


@pytest.mark.parametrize("policy", EVICTION_POLICIES)
def test_every_policy_keeps_the_pool_invariants_under_churn(policy: str) -> None:
    import random

    rng = random.Random(0)
    pool = BlockPool(9, policy, next_use=(lambda key: key[0] % 5) if policy == "belady" else None)
    held: list[KVBlock] = []
    for _ in range(400):
        if held and (rng.random() < 0.5 or pool.num_free_blocks == 0):
            pool.free_blocks([held.pop(rng.randrange(len(held)))])
        elif rng.random() < 0.3 and pool.num_cached_blocks:
            block = pool.get_cached_block(h(rng.randrange(1, 40)))
            if block is not None:
                pool.touch([block])
                held.append(block)
        else:
            (block,) = pool.get_new_blocks(1)
            pool.cache_full_blocks([block], [h(rng.randrange(1, 40))])
            held.append(block)
        pool.check_invariants()
    pool.free_blocks(held)
    pool.check_invariants()
    assert pool.num_free_blocks == pool.num_usable_blocks


def test_bad_policy_arguments_name_the_field() -> None:
    with pytest.raises(ValueError, match="eviction_policy"):
        BlockPool(4, "random")
    with pytest.raises(ValueError, match="eviction_policy: 'belady' needs next_use"):
        new_eviction_queue("belady")
    with pytest.raises(ValueError, match="eviction_policy"):
        new_eviction_queue("lru", next_use=lambda key: 0.0)
