"""The scheduler's policy with a real KV cache manager and no model.

Block size 4, block 0 is the null block, prefix caching off. The model is replaced by a fixed
sampled token for every request that samples, so each test pins exactly which requests run
each step and how many tokens each gets.
"""

from __future__ import annotations

import pytest

from kvserve.config import EngineConfig
from kvserve.engine.preemption import make_preemption_strategy
from kvserve.engine.request_queue import RequestQueue
from kvserve.engine.scheduler import Scheduler, SchedulerConfig
from kvserve.engine.scheduler_output import ModelRunnerOutput
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams


def make_scheduler(
    num_blocks: int = 64,
    budget: int = 8,
    chunked: bool = True,
    max_bypass_steps: int = 4,
) -> Scheduler:
    manager = KVCacheManager(num_blocks, 4, max_model_len=64, enable_prefix_caching=False)
    config = SchedulerConfig(
        max_num_seqs=8,
        max_num_batched_tokens=budget,
        max_model_len=64,
        enable_chunked_prefill=chunked,
        max_bypass_steps=max_bypass_steps,
    )
    return Scheduler(config, manager)


def add(scheduler: Scheduler, request_id: str, num_prompt_tokens: int) -> None:
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    scheduler.add_request(Request(request_id, list(range(num_prompt_tokens)), params))


def step(scheduler: Scheduler) -> list[tuple[str, int]]:
    """One step with token 7 sampled for every request that samples; (id, num_new_tokens)."""
    output = scheduler.schedule()
    sampled = [entry.request_id for entry in output.scheduled if entry.sample]
    scheduler.update_from_output(
        output, ModelRunnerOutput(sampled, [7] * len(sampled), [None] * len(sampled))
    )
    scheduler.check_invariants()
    return [(entry.request_id, entry.num_new_tokens) for entry in output.scheduled]


def waiting_ids(scheduler: Scheduler) -> list[str]:
    return [request.request_id for request in scheduler.waiting]


def test_token_budget_is_shared_running_first_and_prefills_are_chunked() -> None:
    scheduler = make_scheduler(budget=8)
    for request_id in ("a", "b", "c"):
        add(scheduler, request_id, 5)
    assert step(scheduler) == [("a", 5), ("b", 3)]  # b's prefill is cut to the budget left
    assert step(scheduler) == [("a", 1), ("b", 2), ("c", 5)]
    assert step(scheduler) == [("a", 1), ("b", 1), ("c", 1)]


def test_decodes_come_first_and_keep_their_order() -> None:
    scheduler = make_scheduler(budget=16)
    add(scheduler, "a", 5)
    assert step(scheduler) == [("a", 5)]
    add(scheduler, "b", 6)
    add(scheduler, "c", 1)  # a one-token prompt runs like a decode
    assert step(scheduler) == [("a", 1), ("c", 1), ("b", 6)]


def test_the_newest_running_request_is_preempted_and_resumes_at_the_head() -> None:
    scheduler = make_scheduler(num_blocks=5, budget=64)  # 4 usable blocks of 4 tokens
    add(scheduler, "a", 7)
    add(scheduler, "b", 7)
    assert step(scheduler) == [("a", 7), ("b", 7)]  # 2 blocks each, all 4 taken
    assert step(scheduler) == [("a", 1), ("b", 1)]  # position 7 ends the second block
    add(scheduler, "c", 5)  # needs 2 blocks
    # a's position 8 needs a third block: b, the newest, gives its blocks back
    assert step(scheduler) == [("a", 1)]
    b = scheduler.requests["b"]
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert scheduler.kv_cache_manager.get_block_ids("b") == []
    assert waiting_ids(scheduler) == ["b", "c"]
    assert scheduler.num_preemptions == 1
    assert step(scheduler) == [("a", 1)]  # 1 block is free: b needs 3 for 9 tokens, c 2
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    # b recomputes its prompt and both sampled tokens, ahead of c (which no longer fits)
    assert step(scheduler) == [("b", 9)]
    assert b.output_token_ids == [7, 7, 7]
    assert waiting_ids(scheduler) == ["c"]


def test_a_request_that_does_not_fit_is_passed_only_for_max_bypass_steps() -> None:
    # Without chunked prefill a prompt runs whole: "big" needs all 8 tokens of the budget,
    # which the running decodes never leave.
    scheduler = make_scheduler(budget=8, chunked=False, max_bypass_steps=2)
    add(scheduler, "r", 4)
    assert step(scheduler) == [("r", 4)]
    add(scheduler, "big", 8)
    add(scheduler, "s1", 2)
    assert step(scheduler) == [("r", 1), ("s1", 2)]  # big passed over: 1
    add(scheduler, "s2", 2)
    assert step(scheduler) == [("r", 1), ("s1", 1), ("s2", 2)]  # passed over: 2
    add(scheduler, "s3", 2)
    assert step(scheduler) == [("r", 1), ("s1", 1), ("s2", 1)]  # nobody passes big any more
    assert waiting_ids(scheduler) == ["big", "s3"]
    scheduler.finish_requests(["r", "s1", "s2"], RequestStatus.FINISHED_ABORTED)
    assert step(scheduler) == [("big", 8)]
    assert step(scheduler) == [("big", 1), ("s3", 2)]


def test_strict_fcfs_when_no_bypass_is_allowed() -> None:
    scheduler = make_scheduler(budget=8, chunked=False, max_bypass_steps=0)
    add(scheduler, "r", 4)
    step(scheduler)
    add(scheduler, "big", 8)
    add(scheduler, "s1", 2)
    assert step(scheduler) == [("r", 1)]
    assert waiting_ids(scheduler) == ["big", "s1"]


def test_a_request_that_does_not_fit_the_kv_pool_is_passed_by_smaller_ones() -> None:
    scheduler = make_scheduler(num_blocks=5, budget=64)  # 4 usable blocks
    add(scheduler, "r", 8)
    assert step(scheduler) == [("r", 8)]  # 2 blocks
    add(scheduler, "big", 12)  # 3 blocks, 2 are free
    add(scheduler, "small", 4)
    assert step(scheduler) == [("r", 1), ("small", 4)]
    assert waiting_ids(scheduler) == ["big"]


def test_request_queue_is_first_come_first_served() -> None:
    queue = RequestQueue(max_bypass_steps=1)
    a, b, c, d = (Request(i, [1], SamplingParams()) for i in "abcd")
    queue.push(a)
    queue.push(b)
    queue.prepend(c)
    queue.insert_after(c, d)
    assert [r.request_id for r in queue] == ["c", "d", "a", "b"]
    assert queue.peek() is c and queue.pop_front() is c
    queue.remove(a)
    assert [r.request_id for r in queue] == ["d", "b"] and len(queue) == 2
    with pytest.raises(ValueError):
        queue.remove(a)
    assert queue.start_admission() == [d, b]
    assert queue.skip(d)  # d does not fit: b may pass it once
    queue.admit(b)
    queue.end_admission()
    queue.push(a)
    assert queue.start_admission() == [d, a]
    assert not queue.skip(d)  # passed once already: nothing behind it this step


def test_request_queue_rejects_a_negative_bound() -> None:
    with pytest.raises(ValueError, match="max_bypass_steps"):
        RequestQueue(max_bypass_steps=-1)


def test_swap_preemption_needs_a_kv_tier() -> None:
    with pytest.raises(ValueError, match="preemption_mode: 'swap' needs a KV tier"):
        EngineConfig(preemption_mode="swap")
    with pytest.raises(ValueError, match="preemption_mode"):
        make_preemption_strategy("swap", KVCacheManager(4, 4, max_model_len=8))
