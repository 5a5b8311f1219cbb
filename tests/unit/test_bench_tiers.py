"""The pure parts of `kvserve bench tiers` / `trace-tiers`, and the private redis-server."""

from __future__ import annotations

import argparse
import shutil

import pytest

from kvserve.bench.redis_server import RedisServer, ping
from kvserve.bench.tier_bench import bench_config, crossover, place_configs, prefix_lengths
from kvserve.bench.trace_tiers import parse_gb_s, sample_conversations, tier_specs
from kvserve.config import EngineConfig
from kvserve.sim.tiers import TierSpec
from kvserve.trace.records import TraceRecord


def test_prefix_lengths_round_to_blocks_and_cap_at_max_model_len() -> None:
    # 4096 + 8 + 1 > 4096: the longest fitting prefix is 4080 (255 blocks)
    assert prefix_lengths([256, 4096, 300, 8, 5000], 4096, 16, 8) == [256, 288, 4080]
    assert prefix_lengths([4096], 4112, 16, 8) == [4096]


def test_crossover_is_the_shortest_length_from_which_restoring_stays_faster() -> None:
    lengths = [256, 512, 1024, 2048]
    recompute = [10.0, 20.0, 40.0, 80.0]
    assert crossover(lengths, [12.0, 19.0, 21.0, 30.0], recompute) == 512
    assert crossover(lengths, [9.0, 21.0, 30.0, 40.0], recompute) == 1024  # a dip does not count
    assert crossover(lengths, [1.0, 2.0, 3.0, 4.0], recompute) == 256
    assert crossover(lengths, [1.0, 2.0, 3.0, 90.0], recompute) is None


def test_bench_config_sizes_the_pool_for_the_longest_prompt() -> None:
    config = bench_config(EngineConfig(), 4096, 8)
    assert (config.max_model_len, config.num_kv_blocks) == (4112, 258)
    given = bench_config(EngineConfig(max_model_len=2048, kv_cache_memory_bytes=1 << 28), 4096, 8)
    assert (given.max_model_len, given.num_kv_blocks) == (2048, None)
    for suffix_len in (0, 16):
        with pytest.raises(ValueError, match="suffix_len"):
            bench_config(EngineConfig(), 256, suffix_len)


def test_place_configs_give_each_engine_one_tier_and_forced_restores() -> None:
    base = EngineConfig(kv_cpu_bytes=5, kv_disk_dir="/given", preemption_mode="swap")
    configs = place_configs(base, "/tmp/d", "redis://127.0.0.1:1/0")
    tiers = {name: (c.kv_cpu_bytes, c.kv_disk_dir, c.kv_remote_url) for name, c in configs.items()}
    assert tiers == {
        "pool": (0, None, None),
        "cpu": (5, None, None),
        "disk": (0, "/tmp/d", None),
        "redis": (0, None, "redis://127.0.0.1:1/0"),
    }
    assert {c.kv_restore for c in configs.values()} == {"always"}
    assert "redis" not in place_configs(base, "/tmp/d", None)


def _record(line: int, hash_ids: tuple[int, ...]) -> TraceRecord:
    return TraceRecord(line, float(line), 512 * len(hash_ids), 10, hash_ids)


def test_sample_conversations_keeps_whole_conversations() -> None:
    hash_ids = [(0, 6, 1), (0, 7), (0, 6, 1, 2), (0,)]
    records = [_record(line, ids) for line, ids in enumerate(hash_ids, start=1)]
    assert [r.line for r in sample_conversations(records, 3)] == [1, 3]
    assert [r.line for r in sample_conversations(records, 1)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="--sample-conversations"):
        list(sample_conversations(records, 0))


def test_tier_specs_are_cumulative_in_chain_order() -> None:
    args = argparse.Namespace(cpu_blocks=8, disk_blocks=64, redis_blocks=512)
    gb_s = parse_gb_s("cpu:5,disk:1,redis:0.5")
    assert tier_specs("pool", args, gb_s) == []
    assert tier_specs("disk", args, gb_s) == [TierSpec("cpu", 8, 5.0), TierSpec("disk", 64, 1.0)]
    assert [t.name for t in tier_specs("redis", args, gb_s)] == ["cpu", "disk", "redis"]


@pytest.mark.parametrize("text", ["cpu:5,disk:1", "cpu:5,disk:x,redis:1", "cpu:0,disk:1,redis:1"])
def test_parse_gb_s_names_the_flag(text: str) -> None:
    with pytest.raises(ValueError, match="--tier-gb-s"):
        parse_gb_s(text)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_server_runs_for_the_block_and_stops_after() -> None:
    server = RedisServer()
    with server as url:
        assert url == f"redis://127.0.0.1:{server.port}/0"
        assert ping(server.port)
    assert not ping(server.port)
