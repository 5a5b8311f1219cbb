"""The replicas' metrics as one engine's: `/metrics` of `kvserve cluster` sums them.

Counters add up; so do the gauges of requests and blocks, and KV usage is blocks used over
blocks in all. A replica that restarts starts its counters at zero again: what it had counted
is kept (`RetiredCounters`), so the sums never go down.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvserve.cluster.handoff import HandoffStats
from kvserve.cluster.routing import ReplicaState
from kvserve.outputs import EngineMetrics, TierMetrics
from kvserve.server.metrics import PREFIX

_GAUGES = frozenset(
    {
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage",
        "num_kv_blocks",
        "num_kv_blocks_used",
        "num_kv_blocks_cached",
    }
)
_ZERO = EngineMetrics(0, 0, 0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


class RetiredCounters:
    """The counters of replica incarnations that are gone (their gauges dropped)."""

    def __init__(self) -> None:
        self.total = _ZERO

    def retire(self, last: EngineMetrics | None) -> None:
        """Keep the counters of an incarnation that restarted (`last`: its last report)."""
        if last is not None:
            gauges: dict[str, Any] = {name: 0 for name in _GAUGES}
            gauges["kv_cache_usage"] = 0.0
            self.total = _add(self.total, dataclasses.replace(last, **gauges))


def sum_metrics(reports: Sequence[EngineMetrics], retired: RetiredCounters) -> EngineMetrics:
    """One snapshot for the replicas' reports and the counters of retired incarnations."""
    total = retired.total
    for report in reports:
        total = _add(total, report)
    usage = total.num_kv_blocks_used / total.num_kv_blocks if total.num_kv_blocks else 0.0
    return dataclasses.replace(total, kv_cache_usage=usage)


def _add(a: EngineMetrics, b: EngineMetrics) -> EngineMetrics:
    values: dict[str, Any] = {}
    for field in dataclasses.fields(EngineMetrics):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if field.name == "kv_tiers":
            values[field.name] = {name: _add_tier(x.get(name), y.get(name)) for name in {**x, **y}}
        elif isinstance(x, dict):
            values[field.name] = {key: x.get(key, 0) + y.get(key, 0) for key in {**x, **y}}
        else:
            values[field.name] = x + y
    return EngineMetrics(**values)


def _add_tier(a: TierMetrics | None, b: TierMetrics | None) -> TierMetrics:
    if a is None or b is None:
        present = a if b is None else b
        assert present is not None
        return present
    values: dict[str, Any] = {}
    for field in dataclasses.fields(TierMetrics):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if field.name == "load_seconds_buckets":
            values[field.name] = tuple(
                (bound, count + other) for (bound, count), (_, other) in zip(x, y, strict=True)
            )
        else:
            values[field.name] = x + y
    return TierMetrics(**values)


class RoutingCollector(Collector):
    """The cluster's own families, one sample per replica (`replica` label: its index):

        kvserve:cluster_replica_up                  gauge, 1 while the router sends to it
        kvserve:cluster_replica_in_flight           gauge, sequences routed to it, unfinished
        kvserve:cluster_replica_indexed_blocks      gauge, block hashes in its prefix index
        kvserve:cluster_routed_requests_total       counter, by `reason` ("prefix", "load", "turn",
                                                    "slo": the SLO sent it past the router's pick)

    and, with prefill/decode disaggregation (cluster/handoff.py), the handoffs:
    kvserve:kv_transfer_requests_total / _blocks_total / _bytes_total / _seconds_total.
    """

    def __init__(self, cluster: RoutingView) -> None:
        self._cluster = cluster

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            PREFIX + "cluster_replica_up",
            "1 while the router sends to the replica.",
            labels=["replica"],
        )
        in_flight = GaugeMetricFamily(
            PREFIX + "cluster_replica_in_flight",
            "Sequences routed to the replica and not finished.",
            labels=["replica"],
        )
        indexed = GaugeMetricFamily(
            PREFIX + "cluster_replica_indexed_blocks",
            "Block hashes the router knows the replica holds.",
            labels=["replica"],
        )
        for index, state in enumerate(self._cluster.replicas):
            up.add_metric([str(index)], float(state.up))
            in_flight.add_metric([str(index)], state.in_flight)
            indexed.add_metric([str(index)], len(state.blocks))
        routed = CounterMetricFamily(
            PREFIX + "cluster_routed_requests",
            "Requests routed to the replica, by the reason it won.",
            labels=["replica", "reason"],
        )
        for (index, reason), count in sorted(self._cluster.routed.items()):
            routed.add_metric([str(index), reason], count)
        yield from (up, in_flight, indexed, routed)
        stats = self._cluster.handoffs
        handoffs = {
            "kv_transfer_requests": ("Requests handed from prefill to decode.", stats.requests),
            "kv_transfer_blocks": ("KV blocks the decode engines took.", stats.blocks),
            "kv_transfer_bytes": ("Bytes of KV handed over.", stats.bytes),
            "kv_transfer_seconds": ("Export, transfer and import, as waited for.", stats.seconds),
        }
        for name, (doc, value) in handoffs.items():
            family = CounterMetricFamily(PREFIX + name, doc)
            family.add_metric([], value)
            yield family


class RoutingView(Protocol):
    replicas: list[ReplicaState]
    routed: dict[tuple[int, str], int]
    handoffs: HandoffStats
