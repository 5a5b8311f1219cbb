"""The measured cost table of `kv_restore="auto"` (restore_policy.py weighs it).

- A tier's load cost: `probe_store` at start-up (once the pool's block layout is known) puts a
  tiny value and one block under fresh keys, times `get` of each (the block also decoded: the
  checksum and the copy into tensors are part of a load) and removes them: the tiny value's
  time is the per-block latency, the rest of the block's time gives the bandwidth. Every block
  read at lookup then updates the bandwidth (`observe_load`, an exponentially weighted average).
- The prefill rate: seconds per token of the forwards that compute prompt chunks
  (`observe_forward`, reported by the model runner through the connector), averaged the same
  way. All-decode forwards are left out: their time is the per-step cost (reading the weights
  once) that a restore does not save. Until one is seen the rate is unknown and "auto" loads,
  as "always" does: restoring is what tiers are for, and the first prefill comes right after
  start-up, so the guess is short-lived (a dummy forward at start-up would time a cold model
  and lengthen every start).

A tier the decision stops loading from is never read, so its cost would never be updated:
one slow read (a page fault, a pause) could then keep it out for good. So a tier whose cost
was last measured more than `stale_after_s` ago is probed again when a decision leaves its
blocks to the forward (`is_stale`; tiered.py re-probes and decides again).

Averages are ratios of decayed sums (seconds over bytes or tokens), so a large forward weighs
more than a small one, and the first observation is taken as it is.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

from kvserve.kv.tiers.base import KVStore
from kvserve.kv.tiers.restore_policy import CostTable, TierCost


class _DecayedRatio:
    """sum(w * numerator) / sum(w * denominator), older observations decaying by 1 - weight."""

    def __init__(self, numerator: float = 0.0, denominator: float = 0.0) -> None:
        self.numerator = numerator
        self.denominator = denominator

    def add(self, numerator: float, denominator: float, weight: float) -> None:
        self.numerator += weight * (numerator - self.numerator)
        self.denominator += weight * (denominator - self.denominator)

    @property
    def value(self) -> float | None:
        return self.numerator / self.denominator if self.denominator > 0 else None


class RestoreCostModel:
    """Each tier's load cost and the prefill rate, measured and kept up to date.

    Args:
        block_size: tokens per block.
        ewma_weight: weight of each new observation in [0, 1]; 0 keeps the table as it is
            (`fixed`).

    Raises:
        ValueError: ewma_weight outside [0, 1].
    """

    def __init__(
        self,
        block_size: int,
        ewma_weight: float = 0.2,
        stale_after_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 <= ewma_weight <= 1.0:
            raise ValueError(f"ewma_weight: must be in [0, 1], got {ewma_weight}")
        self.block_size = block_size
        self.ewma_weight = ewma_weight
        self.stale_after_s = stale_after_s
        self.clock = clock
        self._measured_at: dict[str, float] = {}  # when each tier's cost was last measured
        self.block_bytes = 0  # one serialized block (set by the probe)
        self._latency_s: dict[str, float] = {}
        self._transfer: dict[str, _DecayedRatio] = {}  # seconds beyond latency / bytes
        self._prefill = _DecayedRatio()  # seconds / tokens

    @classmethod
    def fixed(cls, table: CostTable) -> RestoreCostModel:
        """A model that always answers `table` (observations change nothing): tests, benches."""
        model = cls(table.block_size, ewma_weight=0.0)
        model.block_bytes = table.block_bytes
        for name, cost in table.tiers.items():
            model._latency_s[name] = cost.latency_s
            model._transfer[name] = _DecayedRatio(1.0, cost.bandwidth)
        if table.prefill_s_per_token is not None:
            model._prefill = _DecayedRatio(table.prefill_s_per_token, 1.0)
        return model

    def set_tier(self, name: str, latency_s: float, block_s: float) -> None:
        """A probe's result: a tiny value's latency and one block's load time."""
        self._latency_s[name] = latency_s
        self._transfer[name] = _DecayedRatio(max(block_s - latency_s, 0.0), self.block_bytes)
        self._measured_at[name] = self.clock()

    def observe_load(self, name: str, num_bytes: int, seconds: float) -> None:
        """One block read and decoded from tier `name` in `seconds`."""
        beyond_latency = max(seconds - self._latency_s.get(name, 0.0), 0.0)
        self._transfer.setdefault(name, _DecayedRatio()).add(
            beyond_latency, num_bytes, self.ewma_weight
        )
        self._measured_at[name] = self.clock()

    def is_stale(self, name: str) -> bool:
        """True when tier `name` was measured, but not in the last `stale_after_s` seconds
        (a fixed model never is: its table does not change)."""
        measured_at = self._measured_at.get(name)
        if self.ewma_weight == 0.0 or measured_at is None:
            return False
        return self.clock() - measured_at > self.stale_after_s

    def observe_forward(self, num_tokens: int, num_decodes: int, seconds: float) -> None:
        """One forward of `num_tokens` rows, `num_decodes` of them single-token decodes; an
        all-decode forward says nothing about prefill and is left out."""
        if num_tokens > num_decodes:
            self._prefill.add(seconds, num_tokens, self.ewma_weight)

    def table(self) -> CostTable:
        """The costs as they stand (tiers never measured are left out: they load free)."""
        tiers = {}
        for name, transfer in self._transfer.items():
            s_per_byte = transfer.value
            if s_per_byte is not None:
                bandwidth = 1.0 / s_per_byte if s_per_byte > 0 else float("inf")
                tiers[name] = TierCost(self._latency_s.get(name, 0.0), bandwidth)
        return CostTable(tiers, self.block_bytes, self.block_size, self._prefill.value)


class TierProbe(NamedTuple):
    latency_s: float  # a tiny value's get
    block_s: float  # one block's get and decode


def probe_store(
    store: KVStore,
    key: bytes,
    payload: bytes,
    decode: Callable[[bytes], object | None],
    num_rounds: int = 3,
    keep_stats: bool = True,
) -> TierProbe | None:
    """Time `store` on a tiny value and on `payload` (one block, encoded under `key`), the
    median of `num_rounds` gets each, then remove both. None when the store refuses either
    value or `payload` does not read back.

    With `keep_stats` (at start-up, before any background write) the store's counters are
    put back as they were; a probe while the engine runs leaves its reads and writes counted
    (they are real I/O, and putting counters back would lose the writer thread's updates).

    `key` must be fresh (random), so it names no engine's block; the tiny value's key is
    derived from it. A full store evicts its least recently used entries to make room.
    """
    tiny_key = bytes(reversed(key))
    stats = dataclasses.replace(store.stats) if keep_stats else None
    try:
        if not (store.put(key, payload) and store.put(tiny_key, b"\0")):
            return None
        block_s, latency_s = [], []
        for _ in range(num_rounds):
            start = time.perf_counter()
            value = store.get(key)
            if value is None or decode(value) is None:
                return None
            block_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            store.get(tiny_key)
            latency_s.append(time.perf_counter() - start)
        return TierProbe(statistics.median(latency_s), statistics.median(block_s))
    finally:
        store.remove(key)
        store.remove(tiny_key)
        if stats is not None:
            store.stats = stats
