"""`kvserve cluster`'s /metrics: the replicas' snapshots summed (kvserve/cluster/metrics.py)."""

import dataclasses

from kvserve.cluster.metrics import RetiredCounters, sum_metrics
from kvserve.outputs import EngineMetrics, TierMetrics


def metrics(running, used, total, hits, tier_hits=0, buckets=((0.01, 1), (0.1, 2))):
    tier = TierMetrics(tier_hits, 1, 10, 2, 20, 0, 0, 0, 0, 0.5, 2, buckets)
    return EngineMetrics(
        num_requests_running=running,
        num_requests_waiting=1,
        kv_cache_usage=used / total,
        num_kv_blocks=total,
        num_kv_blocks_used=used,
        num_kv_blocks_cached=3,
        prefix_cache_queries=100,
        prefix_cache_hits=hits,
        prefix_cache_evictions=0,
        num_preemptions=1,
        prompt_tokens=100,
        computed_prompt_tokens=100 - hits,
        generation_tokens=7,
        kv_tiers={"cpu": tier},
        kv_restore_runs={"load": 1},
    )


def test_counters_and_gauges_add_and_usage_is_blocks_used_over_all():
    total = sum_metrics([metrics(2, 10, 100, 40, 5), metrics(1, 30, 100, 60, 7)], RetiredCounters())
    assert total.num_requests_running == 3 and total.num_requests_waiting == 2
    assert total.num_kv_blocks == 200 and total.num_kv_blocks_used == 40
    assert total.kv_cache_usage == 0.2
    assert total.prefix_cache_hits == 100 and total.prefix_cache_queries == 200
    assert total.kv_tiers["cpu"].hits == 12
    assert total.kv_tiers["cpu"].load_seconds_buckets == ((0.01, 2), (0.1, 4))
    assert total.kv_restore_runs == {"load": 2}


def test_a_restarted_replica_keeps_its_counters_but_not_its_gauges():
    retired = RetiredCounters()
    before = metrics(2, 10, 100, 40)
    retired.retire(before)
    fresh = dataclasses.replace(metrics(0, 0, 100, 0), prefix_cache_queries=0)
    total = sum_metrics([fresh], retired)
    assert total.prefix_cache_hits == 40 and total.prefix_cache_queries == 100
    assert total.num_requests_running == 0 and total.num_kv_blocks == 100
    assert total.kv_cache_usage == 0.0 and total.generation_tokens == 14


def test_no_reports_is_zero():
    total = sum_metrics([], RetiredCounters())
    assert total.num_kv_blocks == 0 and total.kv_cache_usage == 0.0
