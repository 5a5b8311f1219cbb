"""Restore or recompute (`kv_restore`) in the engine, and where cached tokens came from.

The workload of test_kv_tiers_engine: a 64-token prefix evicted from a small pool by the
prompts after it, then asked for again. Whatever the decision, the tokens and logprobs equal
those of an engine without tiers; only `num_cached_tokens` (and its split by tier) and the
connector's counters differ. "auto" is given a fixed cost table, so no assertion depends on
this machine's speed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvserve.engine.engine import Engine
from kvserve.kv.tiers.cost import RestoreCostModel
from kvserve.kv.tiers.restore_policy import CostTable, TierCost
from kvserve.kv.tiers.tiered import RestoreStats, TieredConnector
from kvserve.outputs import RequestOutput
from tests.helpers import random_prompts, run_engine, token_ids
from tests.invariance.test_kv_connector import assert_same_logprobs
from tests.invariance.test_kv_tiers_engine import PARAMS, evicting_workload, make, run_one_by_one

CPU_BYTES = 64 * 2**20
# A block takes 16 * 2**-20 s to recompute; loading one from cpu costs 1024 s, or nothing.
LOAD_DEARER = CostTable({"cpu": TierCost(1024.0, float("inf"))}, 0, 16, 2**-20)
LOAD_CHEAPER = CostTable({"cpu": TierCost(0.0, float("inf"))}, 0, 16, 2**-20)


@pytest.fixture(scope="module")
def llama(tiny_checkpoints: dict[str, str]) -> str:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def workload(llama: str) -> tuple[list[list[int]], list[RequestOutput]]:
    """The prompts, and what an engine without tiers answers (it recomputes the prefix)."""
    plain = make(llama)
    prefix, fillers = evicting_workload(plain)
    prompts = [prefix + [5, 6, 7], *fillers, prefix + [8, 9]]
    return prompts, run_one_by_one(plain, prompts)


def connector_of(engine: Engine) -> TieredConnector:
    assert isinstance(engine.kv_connector, TieredConnector)
    return engine.kv_connector


@pytest.mark.parametrize(
    ("restore", "costs", "num_loaded"),
    [
        ("never", None, 0),
        ("always", None, 64),
        ("auto", LOAD_DEARER, 0),
        ("auto", LOAD_CHEAPER, 64),
    ],
)
def test_kv_restore_loads_or_recomputes_with_the_same_outputs(
    llama: str,
    workload: tuple[list[list[int]], list[RequestOutput]],
    restore: str,
    costs: CostTable | None,
    num_loaded: int,
) -> None:
    prompts, want = workload
    engine = make(llama, kv_cpu_bytes=CPU_BYTES, kv_restore=restore)
    connector = connector_of(engine)
    if costs is not None:
        connector.costs = RestoreCostModel.fixed(costs)
    got = run_one_by_one(engine, prompts)
    assert token_ids(got) == token_ids(want)
    assert_same_logprobs(got, want)
    assert got[-1].num_cached_tokens == num_loaded
    assert got[-1].num_cached_tokens_by_tier == ({"cpu": 64} if num_loaded else {})
    num_blocks = num_loaded // 16
    decided = RestoreStats(num_blocks > 0, num_blocks == 0, num_blocks, 4 - num_blocks)
    assert connector.restore_stats == decided  # one lookup found the run
    metrics = engine.get_metrics()
    assert metrics.kv_restore_blocks == {"load": num_blocks, "recompute": 4 - num_blocks}
    assert metrics.kv_restore_runs == {
        "load": int(num_blocks > 0),
        "recompute": int(not num_blocks),
    }
    assert connector.stores[0].stats.hits == num_blocks  # recomputing read nothing
    engine.scheduler.check_invariants()


def test_cached_tokens_are_split_by_pool_cpu_and_disk(llama: str, tmp_path: Path) -> None:
    plain = make(llama)
    engine = make(
        llama, kv_cpu_bytes=CPU_BYTES, kv_disk_dir=str(tmp_path / "kv"), kv_restore="always"
    )
    cpu = connector_of(engine).stores[0]
    (prefix, other) = random_prompts(engine.model_config.vocab_size, [64, 20], seed=3)
    hashes = engine.block_hash_params.block_hashes(prefix)  # h0 h1 h2 h3
    prompts = [prefix + [5, 6, 7], prefix[:16] + other, prefix + [8, 9]]
    want = run_one_by_one(plain, prompts)

    got = run_engine(engine, prompts[:1], PARAMS)  # h0..h3 into the pool, cpu and disk
    assert connector_of(engine).flush(timeout=60)  # disk writes go through a background writer
    for block_hash in hashes[2:]:
        cpu.remove(block_hash)  # now only disk holds h2 h3
    assert engine.kv_cache_manager.reset_prefix_cache()
    got += run_engine(engine, prompts[1:2], PARAMS)  # h0 from cpu, back in the pool
    got += run_engine(engine, prompts[2:], PARAMS)  # h0 pool, h1 cpu, h2 h3 disk

    assert token_ids(got) == token_ids(want)
    assert [o.num_cached_tokens_by_tier for o in got] == [
        {},
        {"cpu": 16},
        {"pool": 16, "cpu": 16, "disk": 32},
    ]
    for output in got:
        assert sum(output.num_cached_tokens_by_tier.values()) == output.num_cached_tokens
