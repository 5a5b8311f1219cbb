"""What the tier chain reports to the engine's metrics: each store's counters (`TierStats`) and
the time to load a block from it, as one `TierMetrics` record per tier (kvserve/outputs.py).

    load latency: read (store.get) + decode (decode_block) of one block at lookup, in seconds,
    counted in buckets by upper bound (Prometheus' `le`), plus their sum and count
"""

from __future__ import annotations

from bisect import bisect_left

from kvserve.kv.tiers.base import TierStats
from kvserve.outputs import TierMetrics

# From a CPU copy of a small block (tens of microseconds) to a slow remote read.
LOAD_SECONDS_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip


class LatencyHistogram:
    """Observations counted in fixed buckets (written by one thread, read by any)."""

    def __init__(self, bounds: tuple[float, ...] = LOAD_SECONDS_BUCKETS) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self._counts[bisect_left(self.bounds, seconds)] += 1  # first bound >= seconds
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> tuple[tuple[float, int], ...]:
        """(bound, observations <= bound) for every finite bound, smallest first."""
        pairs = []
        total = 0
        for bound, count in zip(self.bounds, self._counts, strict=False):
            total += count
            pairs.append((bound, total))
        return tuple(pairs)


def tier_metrics(
    stats: TierStats, load_seconds: LatencyHistogram, occupancy: tuple[int, int, int] = (0, 0, 0)
) -> TierMetrics:
    """One tier's record: its store's counters, its load latency, and what it holds now
    (`KVStore.occupancy`)."""
    return TierMetrics(
        hits=stats.hits,
        misses=stats.misses,
        bytes_read=stats.bytes_read,
        blocks_written=stats.writes,
        bytes_written=stats.bytes_written,
        evictions=stats.evictions,
        errors=stats.errors + stats.failed_writes,
        rejected=stats.rejected,
        dropped_writes=stats.dropped_writes,
        load_seconds_sum=load_seconds.sum,
        load_seconds_count=load_seconds.count,
        load_seconds_buckets=load_seconds.cumulative(),
        blocks_held=occupancy[0],
        bytes_held=occupancy[1],
        capacity_bytes=occupancy[2],
    )
