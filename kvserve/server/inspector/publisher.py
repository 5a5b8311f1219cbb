"""What the engine thread gives the KV inspector: a copy of the cache while a page watches,
and the metrics' time series always.

    engine thread (AsyncEngine)               event loop (routes.py)
    after commands / a step: update()         view(): the latest copy, marks "watched" for
      - a series point every 0.5 s                    WATCH_S seconds; wakes an idle engine
      - a copy (capture_kv_state) if watched,          whose copy is older than its state
        changed, and INTERVAL_S since the last
        (or 100x the last copy's time: copies
        take at most COPY_BUDGET of the engine)
    idle, every 0.5 s or woken: update()

Copies are immutable and replaced whole, as `load_report` is, so the event loop never reads
the pool while the engine changes it. Nothing is copied while no page (or notebook) polls, so
an unwatched inspector costs the engine one time check a step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kvserve.engine.engine import Engine
from kvserve.engine.kv_state import KVShape, KVState, capture_kv_state, kv_shape
from kvserve.server.inspector.series import Series

WATCH_S = 5.0  # a view keeps copies coming this long
INTERVAL_S = 0.15  # at most ~6 copies a second
COPY_BUDGET = 0.01  # and copies take at most 1% of the engine's time (a big pool, fewer)


class KVInspector:
    """The latest copy of the cache (`view`), the series, and the text of cached blocks.

    `show_text`: copies carry token ids, so the page can show what a block holds
    (`--kv-inspector-show-text`; prompts may be private). The token ids of a block that was
    freed but is still cached are remembered by its hash while it stays in the pool.
    """

    def __init__(
        self,
        show_text: bool = False,
        interval_s: float = INTERVAL_S,
        watch_s: float = WATCH_S,
        copy_budget: float = COPY_BUDGET,
    ) -> None:
        self.show_text = show_text
        self.interval_s = interval_s
        self.watch_s = watch_s
        self.copy_budget = copy_budget
        self.series = Series()
        self.wake: Callable[[], None] = lambda: None  # set by the engine loop
        self.state: KVState | None = None
        self.cached_tokens: dict[bytes, tuple[int, ...]] = {}  # hash -> token ids
        self._shape: KVShape | None = None
        self._watched_until = 0.0
        self._next_copy = -float("inf")
        self._stale = True

    def view(self) -> KVState | None:
        """The latest copy (None before the first); keeps copies coming for `watch_s`."""
        self._watched_until = time.monotonic() + self.watch_s
        if self._stale:
            self.wake()
        return self.state

    def update(self, engine: Engine, num_steps: int, changed: bool) -> None:
        """On the engine thread, after commands or a step (`changed`), or when idle."""
        self._stale = self._stale or changed
        self.series.maybe_sample(engine.get_metrics)
        now = time.monotonic()
        if not self._stale or now > self._watched_until or now < self._next_copy:
            return
        if self._shape is None:
            self._shape = kv_shape(engine)
        state = capture_kv_state(engine, self._shape, num_steps, self.show_text)
        if self.show_text:
            self.cached_tokens = _remember_tokens(state, self.cached_tokens)
        self.state = state
        self._stale = False
        spent = time.monotonic() - now
        self._next_copy = now + max(self.interval_s, spent / self.copy_budget)


def _remember_tokens(
    state: KVState, known: dict[bytes, tuple[int, ...]]
) -> dict[bytes, tuple[int, ...]]:
    """Token ids by block hash, for every hashed block of the pool: from the requests that
    hold it now, else as remembered (a new dict: readers may hold the old one)."""
    size = state.shape.block_size
    tokens: dict[bytes, tuple[int, ...]] = {}
    for request in state.requests:
        assert request.token_ids is not None
        for index, block_id in enumerate(request.block_ids):
            block_hash = state.block_hashes[block_id]
            if block_id and block_hash is not None:
                tokens[block_hash] = request.token_ids[index * size : (index + 1) * size]
    for block_hash in state.block_hashes:
        if block_hash is not None and block_hash not in tokens and block_hash in known:
            tokens[block_hash] = known[block_hash]
    return tokens
