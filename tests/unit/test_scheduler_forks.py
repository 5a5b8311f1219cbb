"""Scheduler forks (n > 1 sharing and beam-search copies) with exact block ids, no model.

Block size 4, block 0 is the null block. The model is replaced by a fixed token per request:
the scheduler only needs sampled ids back, so these tests pin the bookkeeping alone.
"""

from __future__ import annotations

import pytest

from kvserve.engine.scheduler import Scheduler, SchedulerConfig
from kvserve.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams


def make_scheduler(num_blocks: int = 16, budget: int = 64, max_num_seqs: int = 8) -> Scheduler:
    manager = KVCacheManager(num_blocks, 4, max_model_len=64, enable_prefix_caching=False)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=64
    )
    return Scheduler(config, manager)


def group(prompt: list[int], n: int) -> list[Request]:
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    return [Request(f"s{i}", prompt, params) for i in range(n)]


def step(scheduler: Scheduler, token_id: int = 7) -> SchedulerOutput:
    """Schedule, 'sample' `token_id` for every request that samples, update, check."""
    output = scheduler.schedule()
    sampled = [entry.request_id for entry in output.scheduled if entry.sample]
    scheduler.update_from_output(
        output, ModelRunnerOutput(sampled, [token_id] * len(sampled), [None] * len(sampled))
    )
    scheduler.check_invariants()
    return output


def tables(scheduler: Scheduler) -> dict[str, list[int]]:
    manager = scheduler.kv_cache_manager
    return {r.request_id: manager.get_block_ids(r.request_id) for r in scheduler.running}


def test_samples_fork_at_the_last_prompt_token_and_copy_the_partial_block() -> None:
    scheduler = make_scheduler()
    scheduler.add_request_group(group(list(range(10)), 3))
    first = step(scheduler)
    # the parent alone computes positions 0..8 (blocks 1, 2, 3), no sampling
    assert [(e.request_id, len(e.token_ids), e.sample) for e in first.scheduled] == [
        ("s0", 9, False)
    ]
    assert tables(scheduler) == {"s0": [1, 2, 3]}
    second = step(scheduler)
    # the samples fork and each computes position 9 into its own copy of block 3
    assert [(e.request_id, e.token_ids, e.sample) for e in second.scheduled] == [
        ("s0", [9], True), ("s1", [9], True), ("s2", [9], True)
    ]  # fmt: skip
    # the first two writers copy block 3, the last one holds it alone and writes in place
    assert second.block_copies == [(3, 4), (3, 5)]
    assert tables(scheduler) == {"s0": [1, 2, 4], "s1": [1, 2, 5], "s2": [1, 2, 3]}
    ref_cnts = [scheduler.kv_cache_manager.pool.blocks[i].ref_cnt for i in range(1, 6)]
    assert ref_cnts == [3, 3, 1, 1, 1]
    assert scheduler.num_computed_prompt_tokens == 9 + 3


def test_block_aligned_fork_point_takes_fresh_blocks() -> None:
    scheduler = make_scheduler()
    scheduler.add_request_group(group(list(range(9)), 2))
    step(scheduler)
    second = step(scheduler)
    assert second.block_copies == []
    assert tables(scheduler) == {"s0": [1, 2, 3], "s1": [1, 2, 4]}


def test_single_token_prompt_forks_before_any_compute() -> None:
    scheduler = make_scheduler()
    scheduler.add_request_group(group([5], 2))
    first = step(scheduler)  # the parent is admitted at its fork point, nothing to run
    assert first.scheduled == [] and tables(scheduler) == {"s0": []}
    second = step(scheduler)
    assert [e.request_id for e in second.scheduled] == ["s0", "s1"]
    assert tables(scheduler) == {"s0": [1], "s1": [2]}


def test_group_waits_until_all_its_samples_fit_max_num_seqs() -> None:
    scheduler = make_scheduler(max_num_seqs=4)
    scheduler.add_request(Request("solo", [1, 2, 3], SamplingParams(max_tokens=8)))
    scheduler.add_request_group(group(list(range(6)), 4))
    step(scheduler)
    assert [r.request_id for r in scheduler.running] == ["solo"]
    scheduler.finish_requests(["solo"], RequestStatus.FINISHED_ABORTED)
    step(scheduler)
    step(scheduler)
    assert sorted(r.request_id for r in scheduler.running) == ["s0", "s1", "s2", "s3"]


def test_fork_request_shares_and_replaces_the_uncomputed_token() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(Request("a", list(range(6)), SamplingParams(max_tokens=8)))
    step(scheduler, token_id=40)  # prompt computed, token 40 sampled (position 6)
    child = scheduler.fork_request("a", "b", 41)
    assert child.all_token_ids == [*range(6), 41]
    assert scheduler.requests["a"].all_token_ids == [*range(6), 40]
    assert tables(scheduler) == {"a": [1, 2], "b": [1, 2]}
    output = step(scheduler)
    assert [(e.request_id, e.token_ids) for e in output.scheduled] == [("a", [40]), ("b", [41])]
    assert output.block_copies == [(2, 3)]
    assert tables(scheduler) == {"a": [1, 3], "b": [1, 2]}


def test_held_requests_are_skipped_and_can_be_preempted() -> None:
    scheduler = make_scheduler()
    for name in ("a", "b"):
        scheduler.add_request(Request(name, [1, 2, 3], SamplingParams(max_tokens=8)))
    step(scheduler)
    scheduler.hold("a")
    output = step(scheduler)
    assert [e.request_id for e in output.scheduled] == ["b"]
    assert scheduler.preempt_held() == 1
    assert scheduler.requests["a"].status == RequestStatus.PREEMPTED
    output = step(scheduler)  # held and waiting: still not admitted
    assert [e.request_id for e in output.scheduled] == ["b"]
    scheduler.release("a")
    output = step(scheduler)
    assert [(e.request_id, e.num_new_tokens) for e in output.scheduled] == [("b", 1), ("a", 4)]


def test_bad_forks_raise() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=8)))
    with pytest.raises(ValueError, match="no uncomputed output token"):
        scheduler.fork_request("a", "b", 5)  # waiting with no output token to replace
    with pytest.raises(ValueError, match="missing"):
        scheduler.fork_request("missing", "b", 5)
    step(scheduler)
    with pytest.raises(ValueError, match="already exists"):
        scheduler.fork_request("a", "a", 5)
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.kv_cache_manager.num_used_blocks == 0
