"""`kvserve trace stats`: what a request trace says about KV reuse, in one streaming pass.

Blocks are the trace's hash ids (512 tokens each in the Mooncake traces). A prompt block is a
hit when its id was seen before (by the chain property of the ids, a seen id's whole prefix
was seen too, so this equals the leading-run definition): the hit ratio of an unbounded cache.

For every hit the pass also records
- its reuse distance: how many distinct blocks were used since this block's last use (LRU
  stack distance), so an LRU cache of C blocks hits exactly the accesses with distance < C;
- its reuse interval: seconds since the last use.
For every block: its lifetime (last use minus first use) and its number of hits, whence the
skew: the share of all hits taken by the most-hit 1% and 10% of blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvserve.trace.records import TraceRecord, block_tokens

RATE_BIN_S = 60.0  # arrival rate is reported per minute of the trace


class _GrowingFenwick:
    """Prefix sums over a list that only grows at the end (append) or changes in place."""

    def __init__(self) -> None:
        self._tree: list[int] = [0]  # 1-based

    def append(self, value: int) -> None:
        i = len(self._tree)
        low = i & -i
        self._tree.append(value + self.prefix(i - 1) - self.prefix(i - low))

    def add(self, index: int, delta: int) -> None:  # 0-based index
        i = index + 1
        while i < len(self._tree):
            self._tree[i] += delta
            i += i & -i

    def prefix(self, count: int) -> int:
        """Sum of the first `count` values."""
        total, i = 0, count
        while i > 0:
            total += self._tree[i]
            i -= i & -i
        return total


@dataclass
class _Block:
    first_s: float
    last_s: float
    last_access: int  # index in the access sequence
    hits: int = 0


@dataclass
class TraceStats:
    num_requests: int = 0
    first_s: float = 0.0
    last_s: float = 0.0
    input_lengths: list[int] = field(default_factory=list)
    output_lengths: list[int] = field(default_factory=list)
    arrivals_per_bin: list[int] = field(default_factory=list)
    num_blocks: int = 0  # prompt block accesses
    num_hits: int = 0
    num_hit_tokens: int = 0
    num_tokens: int = 0
    reuse_distances: list[int] = field(default_factory=list)
    reuse_intervals_s: list[float] = field(default_factory=list)
    blocks: dict[int, _Block] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.last_s - self.first_s


def collect(records: Iterable[TraceRecord]) -> TraceStats:
    """One pass over `records` (sorted by arrival, as TraceReader yields them)."""
    stats = TraceStats()
    recency = _GrowingFenwick()  # 1 at the index of each block's latest access
    for record in records:
        now = record.timestamp_ms / 1000.0
        if stats.num_requests == 0:
            stats.first_s = now
        stats.num_requests += 1
        stats.last_s = now
        stats.input_lengths.append(record.input_length)
        stats.output_lengths.append(record.output_length)
        bin_index = int((now - stats.first_s) // RATE_BIN_S)
        while len(stats.arrivals_per_bin) <= bin_index:
            stats.arrivals_per_bin.append(0)
        stats.arrivals_per_bin[bin_index] += 1
        stats.num_tokens += record.input_length
        for position, block_id in enumerate(record.hash_ids):
            access = stats.num_blocks
            stats.num_blocks += 1
            recency.append(1)
            block = stats.blocks.get(block_id)
            if block is None:
                stats.blocks[block_id] = _Block(now, now, access)
                continue
            stats.num_hits += 1
            stats.num_hit_tokens += block_tokens(record.input_length, position)
            # distinct blocks used strictly between the last use and now
            stats.reuse_distances.append(
                recency.prefix(access) - recency.prefix(block.last_access + 1)
            )
            stats.reuse_intervals_s.append(now - block.last_s)
            recency.add(block.last_access, -1)
            block.hits += 1
            block.last_s = now
            block.last_access = access
    return stats


def summarize(stats: TraceStats) -> dict[str, Any]:
    """The JSON-ready summary (the human table prints from it)."""
    if stats.num_requests == 0:
        raise ValueError("trace: no requests")
    hits = sorted((b.hits for b in stats.blocks.values()), reverse=True)
    lifetimes = [b.last_s - b.first_s for b in stats.blocks.values()]
    reused_lifetimes = [b.last_s - b.first_s for b in stats.blocks.values() if b.hits]
    return {
        "num_requests": stats.num_requests,
        "duration_s": stats.duration_s,
        "mean_rate_rps": stats.num_requests / stats.duration_s if stats.duration_s else None,
        "rate_per_minute": {
            "bin_s": RATE_BIN_S,
            "requests": stats.arrivals_per_bin,
            **distribution([n / RATE_BIN_S for n in stats.arrivals_per_bin]),
        },
        "input_length": distribution(stats.input_lengths),
        "output_length": distribution(stats.output_lengths),
        "num_prompt_blocks": stats.num_blocks,
        "num_distinct_blocks": len(stats.blocks),
        "block_hit_ratio": stats.num_hits / stats.num_blocks,
        "token_hit_ratio": stats.num_hit_tokens / stats.num_tokens,
        "reuse_distance_blocks": distribution(stats.reuse_distances),
        "reuse_interval_s": distribution(stats.reuse_intervals_s),
        "block_lifetime_s": distribution(lifetimes),
        "reused_block_lifetime_s": distribution(reused_lifetimes),
        "reused_blocks_dead_within_10_min": (
            sum(t < 600 for t in reused_lifetimes) / len(reused_lifetimes)
            if reused_lifetimes
            else None
        ),
        "hit_share_top_1pct_blocks": _top_share(hits, 0.01),
        "hit_share_top_10pct_blocks": _top_share(hits, 0.10),
    }


def distribution(values: Sequence[float]) -> dict[str, Any]:
    """count, mean, p50, p90, p99, max (nearest-rank percentiles); None for no values."""
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "p50": _rank(ordered, 0.50),
        "p90": _rank(ordered, 0.90),
        "p99": _rank(ordered, 0.99),
        "max": ordered[-1],
    }


def _rank(ordered: Sequence[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _top_share(hits_desc: Sequence[int], fraction: float) -> float | None:
    total = sum(hits_desc)
    if total == 0:
        return None
    top = max(1, math.ceil(fraction * len(hits_desc)))
    return sum(hits_desc[:top]) / total
