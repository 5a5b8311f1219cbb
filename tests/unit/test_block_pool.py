"""BlockPool and FreeBlockQueue: exact ids, free order, LRU eviction, self-checks."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvserve.kv.block import FreeBlockQueue, KVBlock
from kvserve.kv.block_pool import NULL_BLOCK_ID, BlockPool
from kvserve.kv.kv_events import AllBlocksCleared, BlockRemoved, BlockStored


def ids(blocks: list[KVBlock]) -> list[int]:
    return [block.block_id for block in blocks]


def h(i: int) -> bytes:
    return bytes([i]) * 32


def test_queue_popleft_remove_append_are_exact() -> None:
    blocks = [KVBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    assert queue.block_ids() == [0, 1, 2, 3, 4]
    assert queue.popleft() is blocks[0]
    queue.remove(blocks[2])
    queue.append(blocks[0])
    assert queue.block_ids() == [1, 3, 4, 0]
    assert len(queue) == 4
    assert not blocks[2].in_free_queue
    with pytest.raises(ValueError, match="not in the free queue"):
        queue.remove(blocks[2])
    with pytest.raises(ValueError, match="already in the free queue"):
        queue.append(blocks[1])
    for _ in range(4):
        queue.popleft()
    with pytest.raises(ValueError, match="no free blocks"):
        queue.popleft()


def test_block_zero_is_reserved_and_ids_come_in_order() -> None:
    pool = BlockPool(6)
    assert pool.null_block.block_id == NULL_BLOCK_ID == 0
    assert pool.num_usable_blocks == 5
    assert pool.free_block_ids() == [1, 2, 3, 4, 5]
    blocks = pool.get_new_blocks(3)
    assert ids(blocks) == [1, 2, 3]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 2
    assert pool.usage == pytest.approx(3 / 5)
    pool.check_invariants()


def test_get_new_blocks_beyond_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(3)
    with pytest.raises(ValueError, match="asked for 3 blocks, 2 are free"):
        pool.get_new_blocks(3)
    assert pool.free_block_ids() == [1, 2]
    pool.check_invariants()


def test_free_in_reverse_then_reuse_in_exact_lru_order() -> None:
    pool = BlockPool(8)
    request_blocks = pool.get_new_blocks(4)  # a request's table [1, 2, 3, 4]
    # Callers free tail first, so the tail is the first to be reused or evicted.
    pool.free_blocks(reversed(request_blocks))
    assert pool.free_block_ids() == [5, 6, 7, 4, 3, 2, 1]
    pool.check_invariants()
    assert ids(pool.get_new_blocks(5)) == [5, 6, 7, 4, 3]
    pool.check_invariants()


def test_eviction_drops_the_hash_of_the_least_recently_freed_block() -> None:
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(blocks, [h(1), h(2), h(3)])
    pool.free_blocks([blocks[1]])
    pool.free_blocks([blocks[0]])
    pool.free_blocks([blocks[2]])
    pool.check_invariants()
    assert pool.free_block_ids() == [2, 1, 3]
    assert pool.get_cached_block(h(2)) is blocks[1]  # free blocks keep their hash
    (reused,) = pool.get_new_blocks(1)
    assert reused is blocks[1]
    assert reused.block_hash is None
    assert pool.get_cached_block(h(2)) is None
    assert pool.get_cached_block(h(1)) is blocks[0]
    assert pool.num_evictions == 1
    pool.check_invariants()


def test_touch_revives_a_free_cached_block_from_the_middle() -> None:
    pool = BlockPool(5)
    blocks = pool.get_new_blocks(4)
    pool.cache_full_blocks(blocks[:2], [h(1), h(2)])
    pool.free_blocks(reversed(blocks))
    assert pool.free_block_ids() == [4, 3, 2, 1]
    hit = pool.get_cached_block(h(2))
    assert hit is blocks[1]
    assert pool.free_block_ids() == [4, 3, 2, 1]  # get_cached_block has no side effect
    pool.touch([hit])
    assert hit.ref_cnt == 1
    assert pool.free_block_ids() == [4, 3, 1]
    pool.touch([hit, pool.null_block])  # a second sharer; the null block is skipped
    assert hit.ref_cnt == 2
    assert pool.null_block.ref_cnt == 0
    assert pool.num_evictions == 0
    pool.check_invariants()


def test_duplicate_hash_keeps_the_first_block() -> None:
    pool = BlockPool(4)
    first, second = pool.get_new_blocks(2)
    pool.cache_full_blocks([first], [h(7)])
    pool.cache_full_blocks([second], [h(7)])
    assert pool.get_cached_block(h(7)) is first
    assert second.block_hash is None
    pool.cache_full_blocks([first], [h(8)])  # an already hashed block keeps its hash
    assert first.block_hash == h(7)
    assert pool.num_cached_blocks == 1
    pool.check_invariants()
    with pytest.raises(ValueError, match="2 blocks but 1 hashes"):
        pool.cache_full_blocks([first, second], [h(9)])
    with pytest.raises(ValueError, match="null block"):
        pool.cache_full_blocks([pool.null_block], [h(9)])


def test_over_free_raises_and_null_block_is_never_freed() -> None:
    pool = BlockPool(3)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block, pool.null_block])
    assert pool.free_block_ids() == [2, 1]
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_blocks([block])
    pool.check_invariants()


def test_reset_prefix_cache_only_when_nothing_is_in_use() -> None:
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [h(1), h(2)])
    pool.free_blocks([blocks[1]])
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(h(2)) is blocks[1]
    pool.free_blocks([blocks[0]])
    assert pool.reset_prefix_cache() is True
    assert pool.num_cached_blocks == 0
    assert all(block.block_hash is None for block in pool.blocks)
    pool.check_invariants()


def test_pool_needs_the_null_block() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)
    pool = BlockPool(1)
    assert pool.num_free_blocks == 0
    assert pool.usage == 0.0


def _ref_on_free_block(pool: BlockPool) -> None:
    pool.blocks[3].ref_cnt = 1


def _used_block_in_queue(pool: BlockPool) -> None:
    pool.blocks[1].ref_cnt = 0


def _negative_ref(pool: BlockPool) -> None:
    pool.blocks[2].ref_cnt = -1


def _hash_missing_from_map(pool: BlockPool) -> None:
    pool.blocks[1].block_hash = h(9)


def _map_points_elsewhere(pool: BlockPool) -> None:
    pool.blocks[2].block_hash = None


def _null_block_used(pool: BlockPool) -> None:
    pool.null_block.ref_cnt = 1


@pytest.mark.parametrize(
    "corrupt",
    [
        _ref_on_free_block,
        _used_block_in_queue,
        _negative_ref,
        _hash_missing_from_map,
        _map_points_elsewhere,
        _null_block_used,
    ],
)
def test_check_invariants_detects_corruption(corrupt: Callable[[BlockPool], None]) -> None:
    pool = BlockPool(5)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [h(1), h(2)])
    pool.free_blocks([blocks[1]])
    pool.check_invariants()
    corrupt(pool)
    with pytest.raises(AssertionError):
        pool.check_invariants()


def test_events_record_stores_evictions_and_resets_in_order() -> None:
    pool = BlockPool(4, enable_kv_events=True)
    blocks = pool.get_new_blocks(2)
    assert pool.cache_full_blocks(blocks, [h(1), h(2)]) == blocks
    assert pool.cache_full_blocks(blocks[:1], [h(9)]) == []  # already hashed
    assert pool.take_events() == []  # registered, not written yet
    pool.mark_stored(blocks)
    assert pool.take_events() == [BlockStored(h(1), 1), BlockStored(h(2), 2)]
    assert pool.take_events() == []
    pool.free_blocks(reversed(blocks))
    assert ids(pool.get_new_blocks(2)) == [3, 2]  # 3 was never cached: only 2 is evicted
    assert pool.take_events() == [BlockRemoved(h(2), 2)]
    pool.free_blocks(pool.blocks[2:4])
    assert pool.reset_prefix_cache()
    assert pool.take_events() == [AllBlocksCleared()]


def test_events_off_record_nothing() -> None:
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(1)
    pool.cache_full_blocks(blocks, [h(1)])
    pool.free_blocks(blocks)
    pool.get_new_blocks(2)
    assert pool.num_evictions == 1
    assert pool.take_events() == []
