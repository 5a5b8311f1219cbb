"""Swap preemption == no preemption: a pool too small for the batch, greedy and seeded.

Eight requests (half greedy, half seeded sampling) on a pool of 12 blocks of 16 tokens
preempt; their tokens must equal those of a big pool with no tier, whatever the tier kept.
Invariants are checked after every step and no KV block is held at the end. The counters
say what the preemptions cost: swap recomputes fewer tokens than recompute.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kvserve.config import EngineConfig
from kvserve.engine.engine import Engine
from kvserve.kv.kv_cache import BlockData, KVCaches, read_block, write_block
from kvserve.kv.kv_connector import KVConnector
from kvserve.kv.kv_transfer import BlockTransfer
from kvserve.request import RequestStatus
from kvserve.sampling_params import SamplingParams
from tests.helpers import assert_no_blocks_held, make_engine, random_prompts, run_engine, token_ids

LENGTHS = [3, 40, 17, 64, 1, 29, 50, 8]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    if index % 2 == 0
    else SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, ignore_eos=True, seed=index)
    for index in range(len(LENGTHS))
]
SMALL_POOL = {"num_kv_blocks": 12, "block_size": 16, "max_model_len": 128}
BIG_TIER = 64 * 2**20


class SwapOnlyConnector(KVConnector):
    """Keeps only what swap preemption saves (no write-through), so every block a resumed
    request loads was swapped out by it."""

    def __init__(self) -> None:
        self.store: dict[bytes, BlockData] = {}

    @property
    def saves_blocks(self) -> bool:
        return False

    def num_held_blocks(self, block_hashes: Sequence[bytes]) -> int:
        return self.num_external_hit_blocks(block_hashes)

    def num_external_hit_blocks(self, block_hashes: Sequence[bytes]) -> int:
        count = 0
        while count < len(block_hashes) and block_hashes[count] in self.store:
            count += 1
        return count

    def load_blocks(self, kv_caches: KVCaches, blocks: Sequence[BlockTransfer]) -> None:
        for block in blocks:
            write_block(kv_caches, block.block_id, self.store[block.block_hash])

    def save_blocks(self, kv_caches: KVCaches, blocks: Sequence[BlockTransfer]) -> None:
        for block in blocks:
            self.store[block.block_hash] = read_block(kv_caches, block.block_id)


@pytest.fixture(scope="module")
def llama(tiny_checkpoints: dict[str, str]) -> str:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def prompts(llama: str) -> list[list[int]]:
    return random_prompts(make_engine(llama).model_config.vocab_size, LENGTHS, seed=7)


@pytest.fixture(scope="module")
def reference(llama: str, prompts: list[list[int]]) -> list[list[int]]:
    return token_ids(run_engine(make_engine(llama), prompts, PARAMS))  # no preemption


@pytest.fixture(scope="module")
def recompute(llama: str, prompts: list[list[int]], reference: list[list[int]]) -> Engine:
    engine = make_engine(llama, **SMALL_POOL)
    assert token_ids(run_engine(engine, prompts, PARAMS)) == reference
    assert engine.get_metrics().num_preemptions > 0
    return engine


def test_swap_to_the_cpu_tier_equals_no_preemption_and_recomputes_less(
    llama: str, prompts: list[list[int]], reference: list[list[int]], recompute: Engine
) -> None:
    engine = make_engine(llama, **SMALL_POOL, preemption_mode="swap", kv_cpu_bytes=BIG_TIER)
    assert token_ids(run_engine(engine, prompts, PARAMS)) == reference
    got, baseline = engine.get_metrics(), recompute.get_metrics()
    assert got.num_preemptions == baseline.num_preemptions > 0
    assert got.num_swapped_in_blocks > 0
    assert got.num_preempted_recomputed_tokens < baseline.num_preempted_recomputed_tokens
    assert (baseline.num_swapped_out_blocks, baseline.num_swapped_in_blocks) == (0, 0)


def test_blocks_swapped_out_come_back_equal(
    llama: str, prompts: list[list[int]], reference: list[list[int]], recompute: Engine
) -> None:
    # The config asks for a tier (swap needs one); the connector passed replaces it.
    config = EngineConfig(model=llama, **SMALL_POOL, preemption_mode="swap", kv_cpu_bytes=1)
    engine = Engine(config, kv_connector=SwapOnlyConnector())
    assert token_ids(run_engine(engine, prompts, PARAMS)) == reference
    got = engine.get_metrics()
    # a request preempted twice loads again what it swapped out the first time
    assert got.num_swapped_out_blocks > 0 and got.num_swapped_in_blocks > 0
    baseline = recompute.get_metrics().num_preempted_recomputed_tokens
    assert got.num_preempted_recomputed_tokens < baseline


@pytest.mark.parametrize("kv_cpu_bytes", [1024, 40_000])  # refuses every block; holds ~4
def test_what_the_tier_refuses_or_evicts_is_recomputed(
    llama: str,
    prompts: list[list[int]],
    reference: list[list[int]],
    recompute: Engine,
    kv_cpu_bytes: int,
) -> None:
    engine = make_engine(llama, **SMALL_POOL, preemption_mode="swap", kv_cpu_bytes=kv_cpu_bytes)
    assert token_ids(run_engine(engine, prompts, PARAMS)) == reference
    got, baseline = engine.get_metrics(), recompute.get_metrics()
    assert got.num_swapped_out_blocks > 0  # ordered, then refused or evicted
    if kv_cpu_bytes == 1024:  # nothing kept: exactly recompute's schedule and cost
        assert got.num_swapped_in_blocks == 0
        assert got.num_preempted_recomputed_tokens == baseline.num_preempted_recomputed_tokens


def test_aborting_a_swapped_out_request_while_it_waits(
    llama: str, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    engine = make_engine(llama, **SMALL_POOL, preemption_mode="swap", kv_cpu_bytes=BIG_TIER)
    for index, (prompt, params) in enumerate(zip(prompts, PARAMS, strict=True)):
        engine.add_request(f"r{index}", {"prompt_token_ids": prompt}, params)
    finished: dict[str, list[int]] = {}
    aborted: str | None = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
        engine.scheduler.check_invariants()
        victims = [r for r in engine.scheduler.waiting if r.status == RequestStatus.PREEMPTED]
        if aborted is None and victims:
            aborted = victims[0].request_id
            engine.abort_request(aborted)
            engine.scheduler.check_invariants()
    assert_no_blocks_held(engine)
    assert aborted is not None
    want = {f"r{index}": tokens for index, tokens in enumerate(reference)}
    del want[aborted]
    assert finished == want
