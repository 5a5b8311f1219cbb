"""Per-tier metrics: the load latency histogram, the chain's snapshot (`get_metrics`), and
their Prometheus families (`kvserve:kv_tier_*{tier=...}`)."""

from __future__ import annotations

import dataclasses

import pytest

from kvserve.kv.kv_transfer import BlockTransfer
from kvserve.kv.tiers.cpu import CPUStore
from kvserve.kv.tiers.metrics import LatencyHistogram
from kvserve.kv.tiers.tiered import TieredConnector
from kvserve.outputs import EngineMetrics, TierMetrics
from kvserve.server.metrics import ServerMetrics
from tests.unit.test_kv_tiers_chain import HASHES, PARAMS, caches, chain
from tests.unit.test_kv_tiers_writer import GatedStore


def test_the_histogram_counts_each_observation_under_its_first_bound() -> None:
    histogram = LatencyHistogram((0.001, 0.01, 0.1))
    for seconds in (0.0005, 0.001, 0.002, 0.5):  # 0.001 is <= 0.001 (Prometheus' `le`)
        histogram.observe(seconds)
    assert histogram.cumulative() == ((0.001, 2), (0.01, 3), (0.1, 3))
    assert histogram.count == 4
    assert histogram.sum == pytest.approx(0.5035)


def test_the_snapshot_counts_reads_writes_and_loads_per_tier() -> None:
    cpu = CPUStore(2**20)
    connector, kv = chain(cpu)
    connector.save_blocks(kv, [BlockTransfer(i, HASHES[i - 1]) for i in (1, 2, 3)])
    assert connector.num_external_hit_blocks(HASHES[:4]) == 3  # h4 is nowhere: no get
    metrics = connector.get_metrics()
    assert list(metrics.tiers) == ["cpu"]
    tier = metrics.tiers["cpu"]
    payload = cpu.num_bytes // 3  # every block of one layout encodes to the same size
    assert (tier.hits, tier.misses, tier.bytes_read) == (3, 0, 3 * payload)
    assert (tier.blocks_written, tier.bytes_written) == (3, 3 * payload)
    assert (tier.evictions, tier.errors, tier.rejected, tier.dropped_writes) == (0, 0, 0, 0)
    assert tier.load_seconds_count == 3
    assert tier.load_seconds_buckets[-1][1] <= 3  # the rest are above the last bound
    assert metrics.num_unreadable == 0


def test_dropped_background_writes_reach_the_snapshot() -> None:
    slow = GatedStore(open_gate=True)
    connector = TieredConnector([slow], PARAMS, max_queued_bytes=0)  # drops every write
    connector.save_blocks(caches(), [BlockTransfer(1, HASHES[0]), BlockTransfer(2, HASHES[1])])
    connector.close()
    tier = connector.get_metrics().tiers["gated"]
    assert (tier.dropped_writes, tier.errors, tier.blocks_written) == (2, 0, 0)


def test_a_background_put_that_raised_is_an_error() -> None:
    slow = GatedStore(open_gate=True)
    slow.fail_keys = {HASHES[0]}
    connector = TieredConnector([slow], PARAMS)
    connector.save_blocks(caches(), [BlockTransfer(1, HASHES[0]), BlockTransfer(2, HASHES[1])])
    connector.close()
    tier = connector.get_metrics().tiers["gated"]
    assert (tier.dropped_writes, tier.errors, tier.blocks_written) == (0, 1, 1)


def tier_metrics(**counts: int) -> TierMetrics:
    zero = {field.name: 0 for field in dataclasses.fields(TierMetrics)}
    zero["load_seconds_buckets"] = ((0.001, 1), (0.01, 2))  # type: ignore[assignment]
    return TierMetrics(**{**zero, "load_seconds_sum": 0.004, **counts})  # type: ignore[arg-type]


def engine_metrics(**changes: object) -> EngineMetrics:
    zero = {field.name: 0 for field in dataclasses.fields(EngineMetrics)}
    for name in ("kv_tiers", "kv_restore_runs", "kv_restore_blocks"):
        zero[name] = {}  # type: ignore[assignment]
    return EngineMetrics(**{**zero, **changes})  # type: ignore[arg-type]


def test_metrics_have_one_family_per_tier_counter_with_a_tier_label() -> None:
    tiers = {
        "cpu": tier_metrics(hits=3, bytes_read=300, load_seconds_count=3),
        "disk": tier_metrics(dropped_writes=2, errors=1, load_seconds_count=2),
    }
    metrics = engine_metrics(
        kv_tiers=tiers,
        kv_tier_unreadable=4,
        kv_restore_runs={"load": 2, "recompute": 1},
        kv_restore_blocks={"load": 5, "recompute": 3},
    )
    text = ServerMetrics(lambda: metrics, "m").render().decode()
    for line in (
        'kvserve:kv_tier_hits_total{model_name="m",tier="cpu"} 3.0',
        'kvserve:kv_tier_hits_total{model_name="m",tier="disk"} 0.0',
        'kvserve:kv_tier_bytes_read_total{model_name="m",tier="cpu"} 300.0',
        'kvserve:kv_tier_dropped_writes_total{model_name="m",tier="disk"} 2.0',
        'kvserve:kv_tier_errors_total{model_name="m",tier="disk"} 1.0',
        'kvserve:kv_tier_load_seconds_bucket{le="0.001",model_name="m",tier="cpu"} 1.0',
        'kvserve:kv_tier_load_seconds_bucket{le="+Inf",model_name="m",tier="cpu"} 3.0',
        'kvserve:kv_tier_load_seconds_count{model_name="m",tier="disk"} 2.0',
        'kvserve:kv_tier_load_seconds_sum{model_name="m",tier="cpu"} 0.004',
        'kvserve:kv_tier_unreadable_total{model_name="m"} 4.0',
        'kvserve:kv_restore_runs_total{decision="load",model_name="m"} 2.0',
        'kvserve:kv_restore_blocks_total{decision="recompute",model_name="m"} 3.0',
    ):
        assert line in text.splitlines(), line
    for name in ("misses", "blocks_written", "bytes_written", "evictions", "rejected"):
        assert f'kvserve:kv_tier_{name}_total{{model_name="m",tier="cpu"}} 0.0' in text, name


def test_without_tiers_there_are_no_tier_families() -> None:
    text = ServerMetrics(engine_metrics, "m").render().decode()
    assert "kvserve:num_preemptions_total" in text
    assert "kv_tier" not in text and "kv_restore" not in text
