"""When a block becomes hittable and when it is announced (KV events); a connector's load /
save orders.

Block size 4; block 0 is the null block. The manager is driven step by step as the scheduler
does: allocate (schedule), then `commit_step` (update_from_output, after the forward).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvserve.engine.scheduler import Scheduler, SchedulerConfig
from kvserve.engine.scheduler_output import ModelRunnerOutput
from kvserve.kv.block_hash import block_hashes
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.kv.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from kvserve.kv.kv_transfer import BlockTransfer
from kvserve.request import Request
from kvserve.sampling_params import SamplingParams

BLOCK_SIZE = 4


class FakeTier:
    """The scheduler half of a connector: the hashes it holds, and whether it saves."""

    def __init__(self, held: Sequence[bytes] = (), saves: bool = True) -> None:
        self.held = set(held)
        self.saves = saves
        self.prepared: list[list[BlockTransfer]] = []  # the loads of each schedule

    @property
    def saves_blocks(self) -> bool:
        return self.saves

    def num_external_hit_blocks(self, block_hashes: Sequence[bytes]) -> int:
        count = 0
        while count < len(block_hashes) and block_hashes[count] in self.held:
            count += 1
        return count

    def get_hit_tiers(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        return {"fake": len(block_hashes)} if block_hashes else {}

    def prepare_loads(self, blocks: Sequence[BlockTransfer]) -> None:
        self.prepared.append(list(blocks))


def make_request(request_id: str, token_ids: list[int]) -> Request:
    return Request(request_id, token_ids, SamplingParams(max_tokens=8))


def make_manager(**kwargs: object) -> KVCacheManager:
    kwargs.setdefault("max_model_len", 64)
    return KVCacheManager(11, BLOCK_SIZE, **kwargs)  # type: ignore[arg-type]


def admit(manager: KVCacheManager, request: Request) -> list[int] | None:
    """Schedule a whole prompt (prefix hit first), without running the step."""
    hit, num_hit_tokens = manager.get_computed_blocks(request)
    block_ids = manager.allocate_slots(request, request.num_tokens - num_hit_tokens, hit)
    if block_ids is not None:
        request.num_computed_tokens = request.num_tokens
    return block_ids


def test_a_block_is_hittable_when_scheduled_and_announced_after_its_step_ran() -> None:
    manager = make_manager(enable_kv_events=True)
    a = make_request("a", list(range(9)))
    assert admit(manager, a) == [1, 2, 3]
    assert manager.pool.num_cached_blocks == 2
    assert manager.take_events() == []  # not written yet: nobody is told
    # b, admitted later in the same step with the same prefix, hits a's blocks (the flat
    # forward writes them before any attention reads).
    b = make_request("b", list(range(9)))
    hit, num_hit_tokens = manager.get_computed_blocks(b)
    assert ([block.block_id for block in hit], num_hit_tokens) == ([1, 2], 8)
    assert manager.allocate_slots(b, 1, hit) == [1, 2, 4]
    manager.commit_step()
    manager.check_invariants()
    assert manager.take_events() == [
        BlockStored(a.block_hashes[0], 1),
        BlockStored(a.block_hashes[1], 2),
    ]
    manager.commit_step()  # announced once
    assert manager.take_events() == []


def test_a_request_freed_before_its_step_ran_caches_nothing() -> None:
    manager = make_manager(enable_kv_events=True)
    a = make_request("a", list(range(8)))
    assert admit(manager, a) == [1, 2]
    manager.free(a)  # preempted in the same schedule: its step never runs
    manager.commit_step()
    assert manager.pool.num_cached_blocks == 0
    assert manager.take_events() == []
    manager.check_invariants()


def test_events_stored_then_removed_on_eviction_then_cleared() -> None:
    manager = KVCacheManager(3, BLOCK_SIZE, max_model_len=64, enable_kv_events=True)
    a = make_request("a", list(range(8)))
    admit(manager, a)
    manager.commit_step()
    manager.free(a)  # free: blocks keep their hashes, no event
    h0, h1 = a.block_hashes
    assert manager.take_events() == [BlockStored(h0, 1), BlockStored(h1, 2)]
    b = make_request("b", [50, 51, 52])
    assert admit(manager, b) == [2]  # a's tail block, freed first, is evicted first
    assert manager.take_events() == [BlockRemoved(h1, 2)]
    manager.commit_step()  # b's block is not full: nothing stored
    manager.free(b)
    assert manager.take_events() == []
    assert manager.reset_prefix_cache() is True
    assert manager.take_events() == [AllBlocksCleared()]


def test_events_are_off_by_default() -> None:
    manager = make_manager()
    a = make_request("a", list(range(8)))
    admit(manager, a)
    manager.commit_step()
    assert manager.pool.num_cached_blocks == 2
    assert manager.take_events() == []


def test_hashes_are_computed_with_prefix_caching_off() -> None:
    manager = make_manager(enable_prefix_caching=False, hash_extra_keys=("m", "auto"))
    a = Request("a", list(range(9)), SamplingParams(max_tokens=8), cache_salt="t")
    admit(manager, a)
    manager.commit_step()
    assert a.block_hashes == block_hashes(list(range(9)), 4, ("m", "auto"), cache_salt="t")
    assert manager.pool.num_cached_blocks == 0
    a.append_output_token(9)
    a.append_output_token(10)
    a.append_output_token(11)
    assert manager.allocate_slots(a, 3) == [1, 2, 3]
    assert len(a.block_hashes) == 3


def test_no_connector_no_loads_no_saves() -> None:
    manager = make_manager()
    admit(manager, make_request("a", list(range(9))))
    assert manager.take_blocks_to_load() == []
    assert manager.take_blocks_to_save() == []


def test_saves_list_each_newly_written_full_block_once() -> None:
    manager = make_manager(connector=FakeTier())
    a = make_request("a", list(range(6)))
    hit, _ = manager.get_computed_blocks(a)
    assert manager.allocate_slots(a, 3, hit) == [1]  # chunk 0..2: no block full
    a.num_computed_tokens = 3
    assert manager.take_blocks_to_save() == []
    manager.commit_step()
    assert manager.allocate_slots(a, 3) == [1, 2]  # 3..5: block 1 full, block 2 partial
    a.num_computed_tokens = 6
    assert manager.take_blocks_to_save() == [BlockTransfer(1, a.block_hashes[0])]
    manager.commit_step()
    a.append_output_token(6)
    a.append_output_token(7)
    assert manager.allocate_slots(a, 2) == [1, 2]
    assert manager.take_blocks_to_save() == [BlockTransfer(2, a.block_hashes[1])]
    assert manager.take_blocks_to_save() == []  # taken once


def test_a_hit_continues_through_the_connector_into_fresh_blocks() -> None:
    tier = FakeTier()
    manager = make_manager(connector=tier, enable_kv_events=True)
    warm = make_request("w", list(range(4)) + [99])
    admit(manager, warm)  # pool caches block 1 = tokens 0..3
    manager.commit_step()
    manager.take_blocks_to_save()
    manager.take_events()
    tokens = list(range(14))
    hashes = block_hashes(tokens, BLOCK_SIZE)
    tier.held.update(hashes[:3])  # block 0 is in both: the pool's hit comes first
    request = make_request("r", tokens)
    hit, num_hit_tokens = manager.get_computed_blocks(request)
    assert [block.block_id for block in hit] == [1]
    assert (hit.external_hashes, num_hit_tokens) == (hashes[1:3], 12)
    assert manager.allocate_slots(request, 2, hit) == [1, 3, 4, 5]
    assert manager.take_blocks_to_load() == [
        BlockTransfer(3, hashes[1]),
        BlockTransfer(4, hashes[2]),
    ]
    assert manager.take_blocks_to_load() == []
    assert manager.take_blocks_to_save() == []  # block 5 holds 2 of 4 tokens
    manager.commit_step()  # loaded blocks are written too: hittable now
    assert manager.take_events() == [BlockStored(hashes[1], 3), BlockStored(hashes[2], 4)]
    manager.check_invariants()


def test_a_window_never_loads_from_the_connector() -> None:
    tokens = list(range(14))
    hashes = block_hashes(tokens, BLOCK_SIZE)
    manager = make_manager(connector=FakeTier(hashes), sliding_window=4)
    hit, num_hit_tokens = manager.get_computed_blocks(make_request("r", tokens))
    assert (list(hit), hit.external_hashes, num_hit_tokens) == ([], [], 0)


def test_the_scheduler_orders_loads_and_saves_and_announces_after_the_step() -> None:
    tokens = list(range(10))
    hashes = block_hashes(tokens, BLOCK_SIZE)
    manager = KVCacheManager(
        16, BLOCK_SIZE, max_model_len=64, connector=FakeTier(hashes[:1]), enable_kv_events=True
    )
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    scheduler = Scheduler(config, manager)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for request_id in ("a", "b"):
        scheduler.add_request_group([Request(request_id, tokens, params)])
    output = scheduler.schedule()
    # a loads block 0's K/V from the tier into block 1 and computes 4..9; b, admitted after
    # it in the same step, hits a's blocks 1 and 2 and computes 8..9 into block 4.
    assert [(e.request_id, e.block_ids) for e in output.scheduled] == [
        ("a", [1, 2, 3]),
        ("b", [1, 2, 4]),
    ]
    assert output.blocks_to_load == [BlockTransfer(1, hashes[0])]
    assert isinstance(manager.prefix_cache.connector, FakeTier)
    assert manager.prefix_cache.connector.prepared == [output.blocks_to_load]  # told once
    assert output.blocks_to_save == [BlockTransfer(2, hashes[1])]
    assert manager.take_events() == []  # nothing is written yet
    scheduler.update_from_output(output, ModelRunnerOutput(["a", "b"], [7, 7], [None, None]))
    scheduler.check_invariants()
    assert manager.take_events() == [BlockStored(hashes[0], 1), BlockStored(hashes[1], 2)]
    assert [manager.pool.get_cached_block(h) for h in hashes] == [
        manager.pool.blocks[1],
        manager.pool.blocks[2],
    ]
    later = Request("c", tokens, params)
    hit, num_hit_tokens = manager.get_computed_blocks(later)
    assert ([b.block_id for b in hit], hit.external_hashes, num_hit_tokens) == ([1, 2], [], 8)
