"""`/metrics` in Prometheus text format, with vLLM's metric names under a `kvserve:` prefix.

Gauges and counters are read from the engine at scrape time (`Engine.get_metrics`), so there
is one source of truth; latency histograms are observed by the server as outputs stream out:

    kvserve:num_requests_running / _waiting      gauges
    kvserve:kv_cache_usage_perc                  gauge, fraction of KV blocks in use (0..1)
    kvserve:prefix_cache_queries_total / _hits_total   counters, tokens
    kvserve:num_preemptions_total                counter
    kvserve:num_swapped_out_blocks_total / _swapped_in_blocks_total   counters, blocks
    kvserve:num_preempted_recomputed_tokens_total   counter, tokens
    kvserve:prompt_tokens_total, kvserve:generation_tokens_total   counters
    kvserve:time_to_first_token_seconds, kvserve:inter_token_latency_seconds,
    kvserve:e2e_request_latency_seconds          histograms

With KV tiers below the pool, one family per counter with a `tier` label ("cpu", "disk",
"redis"), from the same snapshot:

    kvserve:kv_tier_hits_total / _misses_total / _bytes_read_total       blocks read at lookup
    kvserve:kv_tier_blocks_written_total / _bytes_written_total
    kvserve:kv_tier_evictions_total / _errors_total / _rejected_total / _dropped_writes_total
    kvserve:kv_tier_load_seconds                 histogram: read + decode of one block
    kvserve:kv_tier_unreadable_total             entries found but corrupt or foreign (no tier)
    kvserve:kv_restore_runs_total / _blocks_total  {decision="load"|"recompute"}: kv_restore
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kvserve.outputs import EngineMetrics, RequestOutput, TierMetrics
from kvserve.server.inspector.series import LatencyWindow

PREFIX = "kvserve:"
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
# kvserve:kv_tier_<field>_total, one per TierMetrics counter: help
_TIER_COUNTERS = {
    "hits": "KV blocks read from the tier at lookup.",
    "misses": "KV blocks looked for in the tier and not read.",
    "bytes_read": "Bytes of KV blocks read from the tier.",
    "blocks_written": "KV blocks written to the tier.",
    "bytes_written": "Bytes of KV blocks written to the tier.",
    "evictions": "KV blocks evicted from the tier to make room.",
    "errors": "I/O errors reading or writing the tier.",
    "rejected": "KV blocks larger than the tier's whole budget.",
    "dropped_writes": "KV block writes dropped: the background writer's queue was full.",
}


class _EngineCollector(Collector):
    def __init__(self, read: Callable[[], EngineMetrics], model_name: str) -> None:
        self._read = read
        self._labels = {"model_name": model_name}

    def collect(self) -> Iterator[Metric]:
        m = self._read()
        gauges = {
            "num_requests_running": (
                "Requests in model execution batches.",
                m.num_requests_running,
            ),
            "num_requests_waiting": ("Requests waiting to be scheduled.", m.num_requests_waiting),
            "kv_cache_usage_perc": ("KV-cache usage, 1 means 100 percent.", m.kv_cache_usage),
        }
        for name, (doc, value) in gauges.items():
            gauge = GaugeMetricFamily(PREFIX + name, doc, labels=list(self._labels))
            gauge.add_metric(list(self._labels.values()), value)
            yield gauge
        counters = {
            "prefix_cache_queries": ("Prefix-cache queries, in tokens.", m.prefix_cache_queries),
            "prefix_cache_hits": ("Prefix-cache hits, in tokens.", m.prefix_cache_hits),
            "num_preemptions": ("Cumulative preemptions.", m.num_preemptions),
            "num_swapped_out_blocks": (
                "Preempted requests' KV blocks saved to a tier.",
                m.num_swapped_out_blocks,
            ),
            "num_swapped_in_blocks": (
                "Resumed requests' KV blocks loaded from a tier.",
                m.num_swapped_in_blocks,
            ),
            "num_preempted_recomputed_tokens": (
                "Tokens computed again after a preemption.",
                m.num_preempted_recomputed_tokens,
            ),
            "prompt_tokens": ("Prompt tokens admitted.", m.prompt_tokens),
            "generation_tokens": ("Generated tokens.", m.generation_tokens),
        }
        for name, (doc, value) in counters.items():
            counter = CounterMetricFamily(PREFIX + name, doc, labels=list(self._labels))
            counter.add_metric(list(self._labels.values()), value)
            yield counter
        if m.kv_tiers:
            yield from self._tier_families(m)

    def _tier_families(self, m: EngineMetrics) -> Iterator[Metric]:
        """One family per tier counter, a sample per tier; the load latency histogram."""
        labels = [*self._labels, "tier"]
        values = list(self._labels.values())
        for field, doc in _TIER_COUNTERS.items():
            counter = CounterMetricFamily(PREFIX + "kv_tier_" + field, doc, labels=labels)
            for tier, tier_metrics in m.kv_tiers.items():
                counter.add_metric([*values, tier], getattr(tier_metrics, field))
            yield counter
        histogram = HistogramMetricFamily(
            PREFIX + "kv_tier_load_seconds", "Time to read and decode one KV block at lookup.",
            labels=labels,
        )  # fmt: skip
        for tier, tier_metrics in m.kv_tiers.items():
            histogram.add_metric(
                [*values, tier], _buckets(tier_metrics), sum_value=tier_metrics.load_seconds_sum
            )
        yield histogram
        unreadable = CounterMetricFamily(
            PREFIX + "kv_tier_unreadable",
            "KV tier entries found but corrupt, truncated or foreign (read as misses).",
            labels=list(self._labels),
        )
        unreadable.add_metric(values, m.kv_tier_unreadable)
        yield unreadable
        decisions = {
            "runs": ("Runs of KV blocks found in a tier, by restore decision.", m.kv_restore_runs),
            "blocks": ("KV blocks found in a tier, by restore decision.", m.kv_restore_blocks),
        }
        for name, (doc, counts) in decisions.items():
            family = CounterMetricFamily(
                PREFIX + "kv_restore_" + name, doc, labels=[*self._labels, "decision"]
            )
            for decision, count in counts.items():
                family.add_metric([*values, decision], count)
            yield family


def _buckets(tier: TierMetrics) -> list[tuple[str, float]]:
    """Prometheus' cumulative buckets: each finite bound, then +Inf (every load)."""
    finite = [(str(bound), float(count)) for bound, count in tier.load_seconds_buckets]
    return [*finite, ("+Inf", float(tier.load_seconds_count))]


class ServerMetrics:
    """One registry per server: the engine collector plus request latency histograms."""

    def __init__(
        self,
        read: Callable[[], EngineMetrics],
        model_name: str,
        collectors: Sequence[Collector] = (),
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(read, model_name))
        for collector in collectors:  # the engine's own (a cluster's routing, say)
            self.registry.register(collector)
        labels = ["model_name"]
        self._ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time to first token.", labels,
            registry=self.registry, buckets=_TTFT_BUCKETS,
        ).labels(model_name)  # fmt: skip
        self._itl = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between output tokens.", labels,
            registry=self.registry, buckets=_ITL_BUCKETS,
        ).labels(model_name)  # fmt: skip
        self._e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds", "End-to-end request latency.", labels,
            registry=self.registry, buckets=_E2E_BUCKETS,
        ).labels(model_name)  # fmt: skip

        self._slo_rejections = Counter(
            PREFIX + "slo_rejections", "Requests answered 429 before prefill: predicted to "
            "miss --slo-ttft-ms or --slo-tpot-ms.", ["model_name", "objective"],
            registry=self.registry,
        )  # fmt: skip
        self._model_name = model_name
        # (TTFT, ITL) windows the KV inspector's percentiles read (server/inspector/series.py)
        self.latency_windows: tuple[LatencyWindow, LatencyWindow] | None = None

    def count_slo_rejection(self, objective: str) -> None:
        """One request turned away for `objective` ("ttft" or "tpot")."""
        self._slo_rejections.labels(self._model_name, objective).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def track(
        self, stream: AsyncGenerator[RequestOutput, None]
    ) -> AsyncGenerator[RequestOutput, None]:
        """Pass outputs through, observing TTFT, the gap per new token, and e2e latency."""
        try:
            async for output in self._observed(stream):
                yield output
        finally:  # a consumer that stops early closes the engine stream now (abort)
            await stream.aclose()

    async def _observed(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        start = last = time.monotonic()
        num_tokens = 0
        async for output in stream:
            now = time.monotonic()
            total = sum(len(c.token_ids) for c in output.outputs)
            if total > num_tokens:
                windows = self.latency_windows
                if num_tokens == 0:
                    self._ttft.observe(now - start)
                    if windows is not None:
                        windows[0].observe(now - start)
                else:
                    gap = (now - last) / (total - num_tokens)
                    for _ in range(total - num_tokens):
                        self._itl.observe(gap)
                    if windows is not None:
                        windows[1].observe(gap)
                num_tokens, last = total, now
            if output.finished:
                self._e2e.observe(now - start)
            yield output
