"""KVCacheManager: exact block ids, prefix hits, eviction, modes, fork/CoW, sliding window.

Block size 4 throughout; block 0 is the null block, so usable ids start at 1. Each helper
drives the manager the way the scheduler does and checks invariants after every operation;
`prefill` and `step` also run the step (`commit_step`), so the full blocks it wrote are
cached when they return (tests/unit/test_kv_transfer.py pins the timing itself).
"""

from __future__ import annotations

import random

import pytest

from kvserve.kv.block_hash import hash_block
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.kv.prefix_cache import PrefixCacheStats
from kvserve.request import Request
from kvserve.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(request_id: str, token_ids: list[int], cache_salt: str | None = None) -> Request:
    return Request(request_id, token_ids, SamplingParams(max_tokens=64), cache_salt=cache_salt)


def make_manager(num_blocks: int = 11, **kwargs: object) -> KVCacheManager:
    kwargs.setdefault("max_model_len", 64)
    return KVCacheManager(num_blocks, BLOCK_SIZE, **kwargs)  # type: ignore[arg-type]


def prefill(
    manager: KVCacheManager, request: Request, chunk: int | None = None
) -> list[int] | None:
    """Admit a request as the scheduler does: prefix hit, then (a chunk of) the rest."""
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(request)
    num_new = request.num_tokens - num_hit_tokens
    if chunk is not None:
        num_new = min(num_new, chunk)
    block_ids = manager.allocate_slots(request, num_new, hit_blocks)
    if block_ids is not None:
        request.num_computed_tokens = num_hit_tokens + num_new
    manager.commit_step()
    manager.check_invariants()
    return block_ids


def step(manager: KVCacheManager, request: Request, num_new: int) -> list[int] | None:
    """Compute the next `num_new` known tokens of a running request."""
    block_ids = manager.allocate_slots(request, num_new)
    if block_ids is not None:
        request.num_computed_tokens += num_new
    manager.commit_step()
    manager.check_invariants()
    return block_ids


def decode(manager: KVCacheManager, request: Request, token_id: int) -> list[int] | None:
    """Append a sampled token and compute it (one decode step)."""
    request.append_output_token(token_id)
    return step(manager, request, 1)


def free(manager: KVCacheManager, request: Request) -> None:
    manager.free(request)
    manager.check_invariants()


def ref_cnts(manager: KVCacheManager, block_ids: list[int]) -> list[int]:
    return [manager.pool.blocks[i].ref_cnt for i in block_ids]


# ---- paged allocation and prefix caching ---------------------------------------------------


def test_block_ids_in_order_and_chunked_prefill_caches_full_blocks_as_they_fill() -> None:
    manager = make_manager()
    request = make_request("a", list(range(10)))
    assert prefill(manager, request, chunk=3) == [1]
    assert manager.pool.num_cached_blocks == 0  # tokens 0..2: no block full yet
    assert step(manager, request, 5) == [1, 2]
    assert manager.pool.num_cached_blocks == 2  # tokens 0..7: both blocks full
    assert step(manager, request, 2) == [1, 2, 3]
    assert manager.pool.num_cached_blocks == 2  # block 3 holds 2 of 4 tokens
    assert decode(manager, request, 10) == [1, 2, 3]
    assert decode(manager, request, 11) == [1, 2, 3]
    assert manager.pool.num_cached_blocks == 3
    assert decode(manager, request, 12) == [1, 2, 3, 4]
    assert manager.get_block_ids("a") == [1, 2, 3, 4]
    assert manager.num_used_blocks == 4
    assert manager.usage == pytest.approx(0.4)


def test_free_is_reverse_order_and_next_allocation_reuses_lru_order() -> None:
    manager = make_manager()
    request = make_request("a", list(range(12)))
    assert prefill(manager, request) == [1, 2, 3]
    free(manager, request)
    assert manager.pool.free_block_ids() == [4, 5, 6, 7, 8, 9, 10, 3, 2, 1]
    other = make_request("b", list(range(100, 132)))
    assert prefill(manager, other) == [4, 5, 6, 7, 8, 9, 10, 3]
    # The request's tail block (3) was evicted first; its prefix (1, 2) is still cached.
    assert manager.prefix_cache_stats.evictions == 1
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(make_request("c", list(range(12))))
    assert [b.block_id for b in hit_blocks] == [1, 2]
    assert num_hit_tokens == 8


def test_shared_prefix_gets_the_cached_blocks_plus_head_of_free_queue() -> None:
    manager = make_manager()
    first = make_request("a", list(range(10)))
    assert prefill(manager, first) == [1, 2, 3]
    free(manager, first)
    assert manager.pool.free_block_ids() == [4, 5, 6, 7, 8, 9, 10, 3, 2, 1]
    second = make_request("b", [*range(8), 90, 91, 92])
    assert prefill(manager, second) == [1, 2, 4]
    assert second.num_computed_tokens == 11
    assert ref_cnts(manager, [1, 2, 3, 4]) == [1, 1, 0, 1]
    assert manager.pool.free_block_ids() == [5, 6, 7, 8, 9, 10, 3]
    assert manager.prefix_cache_stats == PrefixCacheStats(queries=21, hits=8, evictions=0)


def test_get_computed_blocks_has_no_side_effects() -> None:
    manager = make_manager()
    first = make_request("a", list(range(9)))
    prefill(manager, first)
    free(manager, first)
    free_before = manager.pool.free_block_ids()
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(make_request("b", list(range(9))))
    assert ([b.block_id for b in hit_blocks], num_hit_tokens) == ([1, 2], 8)
    assert manager.pool.free_block_ids() == free_before
    assert ref_cnts(manager, [1, 2]) == [0, 0]
    assert manager.prefix_cache_stats == PrefixCacheStats(queries=9, hits=0, evictions=0)


def test_lru_eviction_of_the_least_recently_freed_cached_block() -> None:
    manager = make_manager(num_blocks=5)
    a = make_request("a", list(range(8)))
    b = make_request("b", list(range(100, 108)))
    assert prefill(manager, a) == [1, 2]
    assert prefill(manager, b) == [3, 4]
    free(manager, a)
    free(manager, b)
    assert manager.pool.free_block_ids() == [2, 1, 4, 3]
    c = make_request("c", list(range(200, 203)))
    assert prefill(manager, c) == [2]  # a's tail: freed first, so evicted first
    assert manager.prefix_cache_stats.evictions == 1
    again = make_request("a2", list(range(8)) + [50])
    assert prefill(manager, again) == [1, 4, 3]  # only a's first block still hits
    assert manager.prefix_cache_stats == PrefixCacheStats(
        queries=8 + 8 + 3 + 9, hits=4, evictions=3
    )


def test_ref_counts_return_to_zero_after_sharing() -> None:
    manager = make_manager()
    a = make_request("a", list(range(9)))
    b = make_request("b", list(range(9)))
    assert prefill(manager, a) == [1, 2, 3]
    assert prefill(manager, b) == [1, 2, 4]
    assert ref_cnts(manager, [1, 2, 3, 4]) == [2, 2, 1, 1]
    free(manager, a)
    assert ref_cnts(manager, [1, 2, 3, 4]) == [1, 1, 0, 1]
    free(manager, b)
    free(manager, b)  # idempotent
    assert all(block.ref_cnt == 0 for block in manager.pool.blocks)
    assert manager.num_free_blocks == 10
    assert manager.usage == 0.0


def test_block_aligned_prompt_fully_cached_recomputes_its_last_block() -> None:
    manager = make_manager()
    first = make_request("a", list(range(8)))
    assert prefill(manager, first) == [1, 2]
    free(manager, first)
    second = make_request("b", list(range(8)))
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(second)
    assert ([b.block_id for b in hit_blocks], num_hit_tokens) == ([1], 4)
    assert prefill(manager, second) == [1, 3]
    # Block 3 now holds the same tokens as cached block 2: the first stays cached.
    assert manager.pool.blocks[3].block_hash is None
    assert manager.pool.get_cached_block(second.block_hashes[1]) is manager.pool.blocks[2]


def test_prompt_logprobs_request_recomputes_a_cached_prefix_into_plain_blocks() -> None:
    """A request asking for prompt logprobs takes no prefix hit; its blocks with hashes
    already cached stay plain (the first block keeps the hash), a new block is cached, and
    once its positions are scored (a resume after preemption) it may hit."""
    manager = make_manager()
    a = make_request("a", list(range(9)))
    assert prefill(manager, a) == [1, 2, 3]
    params = SamplingParams(max_tokens=64, prompt_logprobs=2)
    b = Request("b", [*range(8), 70, 71, 72, 73, 74], params)
    assert manager.get_computed_blocks(b) == ([], 0)
    assert prefill(manager, b) == [4, 5, 6, 7]
    assert [manager.pool.blocks[i].block_hash is None for i in (4, 5, 6)] == [True, True, False]
    assert manager.pool.get_cached_block(b.block_hashes[0]) is manager.pool.blocks[1]
    assert manager.pool.get_cached_block(b.block_hashes[2]) is manager.pool.blocks[6]
    assert b.take_prompt_logprob_positions(0, 13) == range(0, 12)
    free(manager, b)  # preempted after scoring: it may now hit its own block 6 too
    b.num_computed_tokens = 0
    hit_blocks, num_hit_tokens = manager.get_computed_blocks(b)
    assert ([blk.block_id for blk in hit_blocks], num_hit_tokens) == ([1, 2, 6], 12)
    free(manager, a)
    assert all(block.ref_cnt == 0 for block in manager.pool.blocks)


def test_cache_salt_separates_tenants() -> None:
    manager = make_manager()
    prefill(manager, make_request("a", list(range(9)), cache_salt="x"))
    cases = {"x": 8, "y": 0, None: 0}
    for salt, expected in cases.items():
        _, num_hit_tokens = manager.get_computed_blocks(make_request("q", list(range(9)), salt))
        assert num_hit_tokens == expected, salt


def test_extra_keys_are_part_of_every_block_hash() -> None:
    manager = make_manager(hash_extra_keys=("model", "float16"))
    request = make_request("a", list(range(5)))
    prefill(manager, request)
    expected = hash_block(None, [0, 1, 2, 3], ("model", "float16"))
    assert manager.pool.get_cached_block(expected) is manager.pool.blocks[1]


def test_allocation_is_all_or_nothing() -> None:
    manager = make_manager(num_blocks=5)
    a = make_request("a", list(range(12)))
    assert prefill(manager, a) == [1, 2, 3]
    b = make_request("b", list(range(100, 108)))
    assert prefill(manager, b) is None
    assert manager.get_block_ids("b") == []
    assert manager.pool.free_block_ids() == [4]
    assert b.num_computed_tokens == 0
    assert manager.prefix_cache_stats.queries == 12  # counted on success only


def test_touching_free_cached_blocks_counts_against_the_free_pool() -> None:
    manager = make_manager(num_blocks=4)
    a = make_request("a", list(range(8)))
    assert prefill(manager, a) == [1, 2]
    free(manager, a)
    assert prefill(manager, make_request("c", [70, 71])) == [3]
    # b hits a's two free cached blocks and needs one more: 2 free - 2 revived = 0 left.
    b = make_request("b", list(range(12)))
    assert prefill(manager, b) is None
    assert manager.pool.free_block_ids() == [2, 1]
    assert manager.pool.num_cached_blocks == 2
    assert ref_cnts(manager, [1, 2]) == [0, 0]


def test_reset_prefix_cache() -> None:
    manager = make_manager()
    a = make_request("a", list(range(9)))
    prefill(manager, a)
    assert manager.reset_prefix_cache() is False
    free(manager, a)
    assert manager.reset_prefix_cache() is True
    assert manager.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    manager.check_invariants()


def test_bad_calls_raise() -> None:
    manager = make_manager(max_model_len=8)
    a = make_request("a", list(range(9)))
    with pytest.raises(ValueError, match="cannot allocate"):
        manager.allocate_slots(a, 9)
    b = make_request("b", list(range(6)))
    prefill(manager, b)
    hits = [manager.pool.blocks[1]]
    with pytest.raises(ValueError, match="prefix-hit blocks"):
        manager.allocate_slots(b, 1, hits)
    with pytest.raises(ValueError, match="cache_mode"):
        make_manager(cache_mode="dense")
    with pytest.raises(ValueError, match="num_blocks"):
        make_manager(num_blocks=0)
    manager.check_invariants()


def test_prefix_caching_off() -> None:
    manager = make_manager(enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    assert prefill(manager, a) == [1, 2, 3]
    free(manager, a)
    assert manager.pool.num_cached_blocks == 0
    assert prefill(manager, make_request("b", list(range(9)))) == [4, 5, 6]
    assert manager.prefix_cache_stats == PrefixCacheStats(0, 0, 0)


# ---- contiguous and none modes ---------------------------------------------------------------


def test_contiguous_reserves_max_model_len_and_admits_only_whole_reservations() -> None:
    manager = make_manager(num_blocks=9, cache_mode="contiguous", max_model_len=14)
    assert manager.num_reserved_blocks == 4  # ceil(14 / 4)
    a = make_request("a", list(range(5)))
    assert prefill(manager, a) == [1, 2, 3, 4]
    for token in range(6):
        assert decode(manager, a, token) == [1, 2, 3, 4]
    b = make_request("b", list(range(5)))
    assert prefill(manager, b) == [5, 6, 7, 8]  # no prefix caching in this mode
    assert manager.get_computed_blocks(make_request("q", list(range(5)))) == ([], 0)
    assert manager.pool.num_cached_blocks == 0
    c = make_request("c", [1])
    assert prefill(manager, c) is None  # one token, but its reservation does not fit
    free(manager, a)
    assert prefill(manager, c) == [4, 3, 2, 1]
    assert manager.usage == 1.0


def test_none_mode_holds_nothing() -> None:
    manager = KVCacheManager(0, BLOCK_SIZE, cache_mode="none", max_model_len=64)
    assert not manager.caches_kv
    a = make_request("a", list(range(9)))
    assert manager.get_computed_blocks(a) == ([], 0)
    assert manager.allocate_slots(a, 9) == []
    manager.check_invariants()
    assert manager.get_block_ids("a") == []
    assert (manager.num_free_blocks, manager.num_used_blocks, manager.usage) == (0, 0, 0.0)
    child = make_request("a.1", list(range(9)))
    manager.fork(a, child)
    assert manager.allocate_slots(child, 9) == []
    free(manager, a)
    free(manager, child)
    assert manager.prefix_cache_stats == PrefixCacheStats(0, 0, 0)


# ---- fork and copy-on-write ------------------------------------------------------------------


def test_fork_shares_blocks_and_copies_the_partial_block_on_first_write() -> None:
    manager = make_manager()
    parent = make_request("p", list(range(6)))
    assert prefill(manager, parent) == [1, 2]
    child = make_request("c", list(range(6)))
    child.num_computed_tokens = parent.num_computed_tokens
    manager.fork(parent, child)
    manager.check_invariants()
    assert manager.get_block_ids("c") == [1, 2]
    assert ref_cnts(manager, [1, 2]) == [2, 2]
    assert manager.num_used_blocks == 2
    # The parent writes position 6 into shared block 2: it gets a copy, block 3.
    assert decode(manager, parent, 100) == [1, 3]
    assert manager.take_block_copies() == [(2, 3)]
    assert manager.take_block_copies() == []
    assert ref_cnts(manager, [1, 2, 3]) == [2, 1, 1]
    # Block 2 is now the child's alone: it writes in place, no copy.
    assert decode(manager, child, 200) == [1, 2]
    assert manager.take_block_copies() == []
    # Full shared block 1 is never copied, even when the child grows past it.
    assert decode(manager, child, 201) == [1, 2]
    assert decode(manager, child, 202) == [1, 2, 4]
    assert manager.take_block_copies() == []
    free(manager, parent)
    free(manager, child)
    assert all(block.ref_cnt == 0 for block in manager.pool.blocks)


def test_fork_at_a_block_boundary_needs_no_copy() -> None:
    manager = make_manager()
    parent = make_request("p", list(range(8)))
    assert prefill(manager, parent) == [1, 2]
    child = make_request("c", list(range(8)))
    child.num_computed_tokens = 8
    manager.fork(parent, child)
    assert decode(manager, child, 5) == [1, 2, 3]
    assert decode(manager, parent, 6) == [1, 2, 4]
    assert manager.take_block_copies() == []
    assert ref_cnts(manager, [1, 2, 3, 4]) == [2, 2, 1, 1]


def test_copy_on_write_is_all_or_nothing() -> None:
    manager = make_manager(num_blocks=3)
    parent = make_request("p", list(range(6)))
    assert prefill(manager, parent) == [1, 2]
    child = make_request("c", list(range(6)))
    child.num_computed_tokens = 6
    manager.fork(parent, child)
    assert decode(manager, parent, 9) is None  # the copy needs a free block: none left
    assert manager.take_block_copies() == []
    assert manager.get_block_ids("p") == [1, 2]
    with pytest.raises(ValueError, match="cannot fork"):
        manager.fork(parent, child)


# ---- sliding window --------------------------------------------------------------------------


def test_sliding_window_frees_old_blocks_and_keeps_positions() -> None:
    manager = make_manager(num_blocks=20, sliding_window=8)
    request = make_request("a", list(range(8)))
    assert prefill(manager, request) == [1, 2]
    for token in range(4):  # positions 8..11
        decode(manager, request, token)
    assert manager.get_block_ids("a") == [1, 2, 3]
    # Computing position 12: positions < 12 - 8 = 4 are never read again, so block 1 goes.
    assert decode(manager, request, 4) == [0, 2, 3, 4]
    assert ref_cnts(manager, [1]) == [0]
    assert manager.pool.free_block_ids()[-1] == 1  # freed, still cached, at the LRU tail
    assert manager.pool.blocks[1].block_hash is not None


def test_sliding_window_keeps_memory_bounded_while_growing_4x_the_window() -> None:
    window = 8
    manager = make_manager(num_blocks=20, sliding_window=window)
    request = make_request("a", list(range(6)))
    prefill(manager, request)
    peak = 0
    while request.num_tokens < 4 * window + 6:
        decode(manager, request, request.num_tokens)
        table = manager.get_block_ids("a")
        assert len(table) == -(-request.num_tokens // BLOCK_SIZE)  # position p: table[p // 4]
        peak = max(peak, manager.num_used_blocks)
    # Kept positions start at a block boundary <= num_computed - window: at most
    # ceil((window + block_size - 1 + 1) / block_size) = 3 blocks for a one-token step.
    assert peak == 3
    assert manager.get_block_ids("a") == [0] * 7 + [8, 9, 10]
    free(manager, request)
    assert manager.num_used_blocks == 0


def test_sliding_window_prefix_hit_skips_blocks_outside_the_window() -> None:
    manager = make_manager(num_blocks=20, sliding_window=8)
    first = make_request("a", list(range(33)))
    assert prefill(manager, first, chunk=8) == [1, 2]
    for _ in range(3):
        step(manager, first, 8)
    step(manager, first, 1)
    assert manager.get_block_ids("a") == [0, 0, 0, 0, 0, 0, 7, 8, 9]
    free(manager, first)
    second = make_request("b", list(range(33)))
    assert prefill(manager, second) == [0, 0, 0, 0, 0, 0, 7, 8, 10]
    # The dropped hit blocks were never touched; the kept ones were revived.
    assert ref_cnts(manager, [1, 2, 3, 4, 5, 6, 7, 8]) == [0, 0, 0, 0, 0, 0, 1, 1]


# ---- self-checks -----------------------------------------------------------------------------


def test_check_invariants_detects_a_ref_count_no_table_explains() -> None:
    manager = make_manager()
    prefill(manager, make_request("a", list(range(5))))
    manager.pool.blocks[1].ref_cnt += 1  # the pool alone still looks consistent
    manager.pool.check_invariants()
    with pytest.raises(AssertionError, match="held by 1 tables"):
        manager.check_invariants()


@pytest.mark.parametrize(("sliding_window", "seed"), [(None, 0), (None, 1), (6, 2), (6, 3)])
def test_random_workload_keeps_invariants(sliding_window: int | None, seed: int) -> None:
    """Admit, grow, fork, preempt and finish requests at random; check after every step."""
    rng = random.Random(seed)
    manager = make_manager(num_blocks=16, max_model_len=48, sliding_window=sliding_window)
    running: list[Request] = []
    prefixes = [[rng.randrange(50) for _ in range(8)] for _ in range(3)]
    for i in range(300):
        action = rng.random()
        if action < 0.3 or not running:
            prompt = rng.choice(prefixes)[: rng.randrange(1, 9)] + [i % 50] * rng.randrange(4)
            request = make_request(f"r{i}", prompt)
            if prefill(manager, request, chunk=rng.choice([None, 3])) is not None:
                running.append(request)
        elif action < 0.4:
            parent = rng.choice(running)
            child = make_request(f"c{i}", list(parent.all_token_ids))
            child.num_computed_tokens = parent.num_computed_tokens
            manager.fork(parent, child)
            manager.check_invariants()
            running.append(child)
        elif action < 0.85:
            request = rng.choice(running)
            if request.num_computed_tokens < request.num_tokens:
                num_new = request.num_tokens - request.num_computed_tokens
                result = step(manager, request, min(num_new, 3))
            elif request.num_tokens < 48:
                result = decode(manager, request, rng.randrange(50))
            else:
                result = None
            if result is None:  # preempt by recompute, or finish at max_model_len
                running.remove(request)
                free(manager, request)
        else:
            free(manager, running.pop(rng.randrange(len(running))))
        manager.take_block_copies()
    for request in running:
        free(manager, request)
    assert manager.num_used_blocks == 0
    assert all(block.ref_cnt == 0 for block in manager.pool.blocks)
