"""Swap preemption: which blocks a victim saves, when, and what its resume counts.

Block size 4, block 0 is the null block, prefix caching on. `FakeTier` is the scheduler half
of a connector holding a chosen set of hashes; the model is replaced by token 7 for every
request that samples. The last test runs the real model runner with a connector that records
the order of its calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvserve.config import EngineConfig
from kvserve.engine.engine import Engine
from kvserve.engine.scheduler import Scheduler, SchedulerConfig
from kvserve.engine.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from kvserve.kv.kv_cache import BlockData, KVCaches, read_block
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.kv.kv_connector import KVConnector
from kvserve.kv.kv_transfer import BlockTransfer
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=20, ignore_eos=True)


class FakeTier:
    """Holds the hashes in `held`; loads what it holds, saves nothing by itself."""

    def __init__(self) -> None:
        self.held: set[bytes] = set()

    @property
    def saves_blocks(self) -> bool:
        return False

    def num_held_blocks(self, block_hashes: Sequence[bytes]) -> int:
        count = 0
        while count < len(block_hashes) and block_hashes[count] in self.held:
            count += 1
        return count

    def num_external_hit_blocks(self, block_hashes: Sequence[bytes]) -> int:
        return self.num_held_blocks(block_hashes)

    def get_hit_tiers(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        return {"fake": len(block_hashes)} if block_hashes else {}

    def prepare_loads(self, blocks: Sequence[BlockTransfer]) -> None:
        return None


def make_manager(num_blocks: int, tier: FakeTier) -> KVCacheManager:
    return KVCacheManager(num_blocks, 4, max_model_len=64, connector=tier)


def make_scheduler(mode: str, tier: FakeTier) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, preemption_mode=mode
    )
    return Scheduler(config, make_manager(5, tier))  # 4 usable blocks of 4 tokens


def step(scheduler: Scheduler) -> SchedulerOutput:
    output = scheduler.schedule()
    sampled = [entry.request_id for entry in output.scheduled if entry.sample]
    scheduler.update_from_output(
        output, ModelRunnerOutput(sampled, [7] * len(sampled), [None] * len(sampled))
    )
    scheduler.check_invariants()
    return output


def test_the_computed_full_blocks_past_the_tiers_run_are_swapped_out() -> None:
    tier = FakeTier()
    manager = make_manager(8, tier)
    request = Request("a", list(range(100, 110)), PARAMS)  # blocks: 4 + 4 + 2 (partial)
    assert manager.allocate_slots(request, 10) == [1, 2, 3]
    request.num_computed_tokens = 10
    h0, h1 = request.block_hashes
    assert manager.get_blocks_to_swap_out(request) == [
        BlockTransfer(1, h0),
        BlockTransfer(2, h1),
    ]  # the partial block 3 has no hash: it is recomputed
    tier.held.add(h0)
    assert manager.get_blocks_to_swap_out(request) == [BlockTransfer(2, h1)]
    tier.held = {h1}  # h1 without h0 is no run: both are saved
    assert manager.get_blocks_to_swap_out(request) == [BlockTransfer(1, h0), BlockTransfer(2, h1)]
    assert manager.get_block_ids("a") == [1, 2, 3]  # a query: nothing freed


def test_only_computed_blocks_are_swapped_out() -> None:
    manager = make_manager(8, FakeTier())
    request = Request("a", list(range(100, 112)), PARAMS)
    manager.allocate_slots(request, 12)
    request.num_computed_tokens = 7  # a chunked prefill stopped inside the second block
    assert manager.get_blocks_to_swap_out(request) == [BlockTransfer(1, request.block_hashes[0])]


def _preempt_b(scheduler: Scheduler, tier: FakeTier) -> tuple[Request, SchedulerOutput]:
    """a and b (7-token prompts) fill the pool; a's third block preempts b at step 3, when
    the tier holds b's first block (as if written through)."""
    for request_id, first in (("a", 100), ("b", 200)):
        scheduler.add_request(Request(request_id, list(range(first, first + 7)), PARAMS))
    step(scheduler)  # a: blocks 1 2, b: blocks 3 4
    step(scheduler)  # position 7 ends the second block of each: 8 tokens computed
    b = scheduler.requests["b"]
    assert scheduler.kv_cache_manager.get_block_ids("b") == [3, 4]
    tier.held.add(b.block_hashes[0])
    output = step(scheduler)
    assert [entry.request_id for entry in output.scheduled] == ["a"]
    assert (b.status, b.num_computed_tokens) == (RequestStatus.PREEMPTED, 0)
    assert scheduler.kv_cache_manager.get_block_ids("b") == []
    return b, output


def test_a_victim_swaps_out_in_the_step_that_preempts_it_and_loads_back_on_resume() -> None:
    tier = FakeTier()
    scheduler = make_scheduler("swap", tier)
    b, output = _preempt_b(scheduler, tier)
    h0, h1 = b.block_hashes[:2]
    assert output.blocks_to_swap_out == [BlockTransfer(4, h1)]  # h0 is in the tier already
    # b's blocks were freed tail first: a took block 4 (the forward overwrites it after the
    # swap-out read it); block 3 still holds h0 in the pool
    assert scheduler.kv_cache_manager.get_block_ids("a") == [1, 2, 4]
    assert scheduler.get_stats().num_swapped_out_blocks == 1
    tier.held.add(h1)  # what the runner's save did
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    output = step(scheduler)
    # b resumes with 9 tokens: h0 from the pool (block 3), h1 loaded from the tier into a
    # fresh block, 1 token computed; a's blocks were freed tail first (4 2 1)
    assert [(e.request_id, e.num_computed_tokens, e.block_ids) for e in output.scheduled] == [
        ("b", 8, [3, 4, 2])
    ]
    assert output.blocks_to_load == [BlockTransfer(4, h1)]
    assert output.blocks_to_swap_out == []
    stats = scheduler.get_stats()
    assert (stats.num_swapped_in_blocks, stats.num_preempted_recomputed_tokens) == (1, 0)


def test_recompute_counts_the_tokens_computed_again() -> None:
    tier = FakeTier()
    scheduler = make_scheduler("recompute", tier)
    b, output = _preempt_b(scheduler, tier)
    assert output.blocks_to_swap_out == []
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    output = step(scheduler)
    # h0 is hit in the pool, h1 was overwritten and is in no tier: tokens 4..7 again
    assert [(e.request_id, e.num_computed_tokens) for e in output.scheduled] == [("b", 4)]
    stats = scheduler.get_stats()
    assert (stats.num_swapped_out_blocks, stats.num_swapped_in_blocks) == (0, 0)
    assert stats.num_preempted_recomputed_tokens == 4


def test_aborting_a_swapped_out_request_while_it_waits_frees_everything() -> None:
    tier = FakeTier()
    scheduler = make_scheduler("swap", tier)
    _preempt_b(scheduler, tier)
    scheduler.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    scheduler.check_invariants()  # the ledger forgot b
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    scheduler.check_invariants()
    assert scheduler.kv_cache_manager.num_used_blocks == 0
    assert scheduler.get_stats().num_preempted_recomputed_tokens == 0


class RecordingConnector(KVConnector):
    """Records every call of the worker half in order, and what each save read."""

    def __init__(self, calls: list[object]) -> None:
        self.calls = calls
        self.saved: list[BlockData] = []

    @property
    def saves_blocks(self) -> bool:
        return False

    def num_external_hit_blocks(self, block_hashes: Sequence[bytes]) -> int:
        return 0

    def load_blocks(self, kv_caches: KVCaches, blocks: Sequence[BlockTransfer]) -> None:
        self.calls.append(("load", [block.block_id for block in blocks]))

    def save_blocks(self, kv_caches: KVCaches, blocks: Sequence[BlockTransfer]) -> None:
        self.calls.append(("save", [block.block_id for block in blocks]))
        self.saved.extend(read_block(kv_caches, block.block_id) for block in blocks)


def test_the_runner_swaps_out_before_loads_and_the_forward(
    tiny_checkpoints: dict[str, str],
) -> None:
    calls: list[object] = []
    connector = RecordingConnector(calls)
    config = EngineConfig(
        model=tiny_checkpoints["llama"], num_kv_blocks=8, block_size=4, max_model_len=16
    )
    runner = Engine(config, kv_connector=connector).model_runner
    assert runner.kv_caches is not None
    with torch.inference_mode():  # the pool was allocated under it
        for layer in runner.kv_caches:
            layer.k[5].fill_(7.0)  # (block_size, num_kv_heads, head_dim): the victim's K/V
    forward = runner._forward

    def recording_forward(*args: object, **kwargs: object) -> object:
        calls.append("forward")
        return forward(*args, **kwargs)  # type: ignore[arg-type]

    runner._forward = recording_forward  # type: ignore[method-assign]
    entry = ScheduledRequest(
        request_id="r",
        token_ids=[3, 4],
        num_computed_tokens=0,
        block_ids=[5],  # the freed block, given to another request in the same step
        sample=True,
        sampling_params=SamplingParams(temperature=0.0, max_tokens=1),
        prompt_token_ids=[3, 4],
        output_token_ids=[],
        eos_token_ids=frozenset(),
    )
    runner.execute(
        SchedulerOutput(
            scheduled=[entry],
            blocks_to_swap_out=[BlockTransfer(5, b"victim")],
            blocks_to_load=[BlockTransfer(6, b"hit")],
            blocks_to_save=[BlockTransfer(5, b"new")],
        )
    )
    assert calls == [("save", [5]), ("load", [6]), "forward", ("save", [5])]
    swapped_k, written_k = connector.saved[0][0][0], connector.saved[1][0][0]
    assert swapped_k is not None and written_k is not None
    assert torch.all(swapped_k == 7.0)  # read before the forward overwrote it
    assert not torch.all(written_k[:2] == 7.0)
