"""Time series of the engine's metrics for the inspector's charts, sampled every
`interval_s` on the engine thread; TTFT and ITL percentiles over the last `window_s` seconds.

A point (JSON-ready), rates over the interval since the previous point:

    t                  seconds since the server started
    kv_usage           fraction of usable blocks held by requests
    hit_rate           prefix-cache hits / queries, in tokens, over the interval (None: none)
    running, waiting   requests
    generation_tok_s   generated tokens a second; prompt_tok_s: prompt tokens computed
    ttft_p50 ... itl_p99   seconds, over the last `window_s` (None: no sample)
    tiers              {tier: {"hits", "misses", "written"}}: blocks up and down in the interval
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from kvserve.outputs import EngineMetrics

PERCENTILES = (50, 90, 99)


class LatencyWindow:
    """Recent latencies of one kind (written on the event loop, read on the engine thread)."""

    def __init__(self, window_s: float = 10.0, maxlen: int = 8192) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=maxlen)

    def observe(self, seconds: float) -> None:
        self._samples.append((time.monotonic(), seconds))

    def percentiles(self, now: float) -> dict[int, float | None]:
        """p50, p90, p99 of the samples of the last `window_s` (nearest rank)."""
        since = now - self.window_s
        values = sorted(v for t, v in tuple(self._samples) if t >= since)
        if not values:
            return dict.fromkeys(PERCENTILES)
        last = len(values) - 1
        return {p: values[min(last, round(p / 100 * last))] for p in PERCENTILES}


class Series:
    """The last `maxlen` points (5 minutes at the default 0.5 s)."""

    def __init__(self, interval_s: float = 0.5, maxlen: int = 600) -> None:
        self.interval_s = interval_s
        self.ttft = LatencyWindow()
        self.itl = LatencyWindow()
        self._points: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self._start = time.monotonic()
        self.origin = time.time()  # t = 0 as wall-clock time: a new origin is a new series
        self._last_t = -float("inf")
        self._last: EngineMetrics | None = None

    def maybe_sample(self, read: Callable[[], EngineMetrics]) -> None:
        """Add a point if `interval_s` passed since the last one (engine thread)."""
        now = time.monotonic()
        if now - self._last_t < self.interval_s:
            return
        metrics = read()
        if self._last is not None:
            self._points.append(self._point(now, metrics, self._last, now - self._last_t))
        self._last, self._last_t = metrics, now

    def points(self, since: float | None = None) -> list[dict[str, Any]]:
        """The points, or only those after `t` = `since` (a page that has the rest)."""
        points = tuple(self._points)
        if since is None:
            return list(points)
        return [p for p in points if p["t"] > since]

    def latest(self) -> EngineMetrics | None:
        return self._last

    def _point(
        self, now: float, m: EngineMetrics, before: EngineMetrics, dt: float
    ) -> dict[str, Any]:
        queries = m.prefix_cache_queries - before.prefix_cache_queries
        point: dict[str, Any] = {
            "t": round(now - self._start, 3),
            "kv_usage": m.kv_cache_usage,
            "hit_rate": (m.prefix_cache_hits - before.prefix_cache_hits) / queries
            if queries
            else None,
            "running": m.num_requests_running,
            "waiting": m.num_requests_waiting,
            "generation_tok_s": (m.generation_tokens - before.generation_tokens) / dt,
            "prompt_tok_s": (m.computed_prompt_tokens - before.computed_prompt_tokens) / dt,
        }
        for name, window in (("ttft", self.ttft), ("itl", self.itl)):
            for p, value in window.percentiles(now).items():
                point[f"{name}_p{p}"] = value
        point["tiers"] = {
            name: {
                "hits": tier.hits - before.kv_tiers[name].hits,
                "misses": tier.misses - before.kv_tiers[name].misses,
                "written": tier.blocks_written - before.kv_tiers[name].blocks_written,
            }
            for name, tier in m.kv_tiers.items()
            if name in before.kv_tiers
        }
        return point
