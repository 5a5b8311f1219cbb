"""Replay a request trace through the engine's own KVCacheManager and BlockPool.

Each trace block (a hash id, 512 tokens in the Mooncake traces) becomes one cache block: the
manager runs with block_size 1 and a request's "tokens" are its hash ids, so the engine's
chained block hashes, prefix lookup, allocation, ref counts and eviction run unchanged:

    trace request   hash_ids [7, 8, 9]   input 1,300 tokens, output 343
    sim tokens      [7, 8, 9, -41]       one fresh id per started output block (at least one,
                                         which also lets the whole prompt hit: the engine
                                         always recomputes a request's last token)

Arrivals come in trace order. A request is admitted as soon as all its blocks fit (first come,
first served; the head waits while others finish), looks up its cached prefix exactly as the
scheduler does (`get_computed_blocks`, then `allocate_slots` for the rest), holds its blocks
for prefill + decode time from `CostModel`, then frees them (`free`). A request with more
blocks than the cache is rejected on arrival and counts as all misses.

With `tiers`, blocks the pool evicts (its `BlockRemoved` events) fall into lower tiers
(`sim.tiers`), and the prefix run continues through them: restored blocks are loaded instead
of recomputed when that is faster.
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.kv.kv_events import BlockRemoved
from kvserve.request import Request
from kvserve.sampling_params import SamplingParams
from kvserve.sim.results import CostModel, SimResult
from kvserve.sim.tiers import LowerTiers, TierSpec
from kvserve.trace.records import TRACE_BLOCK_TOKENS, TraceRecord, block_tokens

Records = Callable[[], Iterable[TraceRecord]]  # a fresh iterator over the trace per call
_NEVER = float("inf")
_PARAMS = SamplingParams(max_tokens=1)


@dataclass
class TraceScan:
    """What one pass over the trace tells every replay: sizes and, for Belady, the accesses.

    `access_ids` lists every prompt block's id in trace order (8 bytes per access);
    `request_blocks` each request's sim blocks (prompt + output) and `request_accesses` its
    prompt blocks, so that `next_accesses` can link the accesses for one capacity.
    """

    num_requests: int = 0
    num_sim_blocks: int = 0  # prompt + output blocks of all requests: an unbounded capacity
    access_ids: array[int] = field(default_factory=lambda: array("q"))
    request_blocks: array[int] = field(default_factory=lambda: array("q"))
    request_accesses: array[int] = field(default_factory=lambda: array("q"))


def scan_trace(records: Iterable[TraceRecord]) -> TraceScan:
    """Count blocks and record the access sequence."""
    scan = TraceScan()
    for record in records:
        num_blocks = len(record.hash_ids) + _num_output_blocks(record)
        scan.num_requests += 1
        scan.num_sim_blocks += num_blocks
        scan.request_blocks.append(num_blocks)
        scan.request_accesses.append(len(record.hash_ids))
        scan.access_ids.extend(record.hash_ids)
    return scan


def next_accesses(scan: TraceScan, capacity_blocks: int) -> array[float]:
    """For each access, the index of the next access of the same id (inf: none), skipping
    the requests a cache of `capacity_blocks` rejects (they never run, so never hit)."""
    links = array("d", [_NEVER]) * len(scan.access_ids)
    following: dict[int, int] = {}  # id -> its next access after the current position
    end = len(scan.access_ids)
    for index in range(scan.num_requests - 1, -1, -1):
        start = end - scan.request_accesses[index]
        if scan.request_blocks[index] <= capacity_blocks:
            for access in range(end - 1, start - 1, -1):
                block_id = scan.access_ids[access]
                links[access] = following.get(block_id, _NEVER)
                following[block_id] = access
        end = start
    return links


def _num_output_blocks(record: TraceRecord) -> int:
    return max(1, -(-record.output_length // TRACE_BLOCK_TOKENS))


@dataclass
class _Running:
    request: Request
    record: TraceRecord
    first_access: int  # index of its first prompt block in the trace's access sequence


class Replay:
    """One replay of a trace at one capacity under one eviction policy.

    Args:
        capacity_blocks: usable cache blocks (the pool has one more: the null block).
        policy: "lru", "fifo", "lfu" or "belady" (needs `scan`).
        cost: durations and K/V bytes.
        scan: from `scan_trace` (needed for "belady").
        tiers: lower tiers below the pool, for the multi-tier what-if.
    """

    def __init__(
        self,
        capacity_blocks: int,
        policy: str,
        cost: CostModel,
        scan: TraceScan | None = None,
        tiers: list[TierSpec] | None = None,
    ) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks: must be >= 1, got {capacity_blocks}")
        if policy == "belady" and scan is None:
            raise ValueError("policy: 'belady' needs the trace scanned first (scan=)")
        self.cost = cost
        self.result = SimResult(policy, capacity_blocks)
        self.lower = LowerTiers(tiers or [], cost)
        for spec in tiers or []:
            self.result.tier_hit_blocks[spec.name] = 0
            self.result.tier_hit_tokens[spec.name] = 0
            self.result.tier_saved_s[spec.name] = 0.0
        self._next_use: dict[bytes, float] = {}
        self._belady = policy == "belady"
        self._next_access = array("d")
        if self._belady:
            assert scan is not None
            self._next_access = next_accesses(scan, capacity_blocks)
        self.manager = KVCacheManager(
            capacity_blocks + 1,
            1,
            max_model_len=1 << 40,
            eviction_policy=policy,
            next_use=self._lookup_next_use if self._belady else None,
            enable_kv_events=bool(tiers),
        )
        self._waiting: deque[_Running] = deque()
        self._running: list[tuple[float, int, _Running]] = []  # (finish time, seq, request)
        self._admissions = itertools.count()
        self._num_accesses = 0
        self._next_output_id = -1

    def _lookup_next_use(self, block_hash: bytes) -> float:
        return self._next_use.get(block_hash, _NEVER)

    def run(self, records: Iterable[TraceRecord]) -> SimResult:
        for record in records:
            now = record.timestamp_ms / 1000.0
            self._finish_until(now)
            self._arrive(record, now)
        self._finish_until(_NEVER)
        self.result.evictions = self.manager.prefix_cache_stats.evictions
        return self.result

    def _arrive(self, record: TraceRecord, now: float) -> None:
        num_outputs = _num_output_blocks(record)
        outputs = range(self._next_output_id, self._next_output_id - num_outputs, -1)
        self._next_output_id -= num_outputs
        request = Request(str(self.result.num_requests), [*record.hash_ids, *outputs], _PARAMS)
        entry = _Running(request, record, self._num_accesses)
        self._num_accesses += len(record.hash_ids)
        self.result.num_requests += 1
        self.result.prompt_blocks += len(record.hash_ids)
        self.result.prompt_tokens += record.input_length
        if request.num_tokens > self.manager.num_usable_blocks:
            self.result.num_rejected += 1  # (Belady's links skip it: see next_accesses)
            return
        self._waiting.append(entry)
        self._admit_waiting(now)

    def _admit_waiting(self, now: float) -> None:
        while self._waiting and self._admit(self._waiting[0], now):
            entry = self._waiting.popleft()
            self.result.queue_wait_s.append(now - entry.record.timestamp_ms / 1000.0)

    def _finish_until(self, now: float) -> None:
        """Free every request finished by `now`; those ending at one instant all free their
        blocks before the queue is admitted at that instant."""
        while self._running and self._running[0][0] <= now:
            finish = self._running[0][0]
            while self._running and self._running[0][0] == finish:
                self.manager.free(heapq.heappop(self._running)[2].request)
            self._admit_waiting(finish)

    def _admit(self, entry: _Running, now: float) -> bool:
        request, record = entry.request, entry.record
        hit_blocks, _ = self.manager.get_computed_blocks(request)
        num_hit = len(hit_blocks)
        if self._belady:  # blocks past the hit: this request cannot use them, whenever it runs
            self._record_future(entry, num_hit, len(record.hash_ids))
        # Found before allocating: allocation demotes evicted blocks, which must not push
        # out what this request restores (a real restore pins its source while it copies).
        restores = self._restorable(entry, num_hit)
        if self.manager.allocate_slots(request, request.num_tokens - num_hit, hit_blocks) is None:
            return False
        self.manager.commit_step()  # the prefill is instantaneous here: its blocks are written
        self._demote_evicted()
        if self._belady:  # the hit blocks, now held: next used after this request
            self._record_future(entry, 0, num_hit)
        hit_tokens = sum(block_tokens(record.input_length, j) for j in range(num_hit))
        restored_tokens, load_s = self._count_restores(restores)
        self.result.hit_blocks += num_hit
        self.result.hit_tokens += hit_tokens
        used = self.manager.num_used_blocks
        self.result.peak_used_blocks = max(self.result.peak_used_blocks, used)
        prefill = record.input_length - hit_tokens - restored_tokens
        duration = self.cost.prefill_s(prefill) + load_s + self.cost.decode_s(record.output_length)
        finish = round(now + duration, 6)  # microseconds: equal sums compare equal
        heapq.heappush(self._running, (finish, next(self._admissions), entry))
        return True

    def _demote_evicted(self) -> None:
        """Blocks the allocation evicted fall into the lower tiers, in eviction order."""
        for event in self.manager.take_events():
            if isinstance(event, BlockRemoved):
                self.lower.put(event.block_hash)

    def _record_future(self, entry: _Running, start: int, stop: int) -> None:
        """Belady: prompt blocks start..stop-1 of this request are next used at their next
        access. A free cached block whose future moved is re-ranked."""
        hashes = entry.request.block_hashes
        pool = self.manager.pool
        for j in range(start, stop):
            next_use = self._next_access[entry.first_access + j]
            if self._next_use.get(hashes[j]) != next_use:
                self._next_use[hashes[j]] = next_use
                pool.refresh_priority(hashes[j])

    def _restorable(self, entry: _Running, num_hit: int) -> list[tuple[TierSpec, int]]:
        """The prefix run after the device hit through the lower tiers: (tier, tokens) per
        block, stopping at a block in no tier or one faster to recompute than to load."""
        if not self.lower.tiers:
            return []
        restores = []
        hashes, record = entry.request.block_hashes, entry.record
        for j in range(num_hit, len(record.hash_ids)):
            tier = self.lower.find(hashes[j])
            tokens = block_tokens(record.input_length, j)
            if tier is None or self.lower.load_s(tier, tokens) >= self.cost.prefill_s(tokens):
                break
            restores.append((tier, tokens))
        return restores

    def _count_restores(self, restores: list[tuple[TierSpec, int]]) -> tuple[int, float]:
        """Add restores to the result: (tokens restored, seconds loading them)."""
        restored_tokens, load_s = 0, 0.0
        for tier, tokens in restores:
            block_load_s = self.lower.load_s(tier, tokens)
            restored_tokens += tokens
            load_s += block_load_s
            self.result.tier_hit_blocks[tier.name] += 1
            self.result.tier_hit_tokens[tier.name] += tokens
            self.result.tier_saved_s[tier.name] += self.cost.prefill_s(tokens) - block_load_s
        return restored_tokens, load_s


def simulate(
    records: Records,
    capacities: list[int | None],
    policies: list[str],
    cost: CostModel,
    tiers: list[TierSpec] | None = None,
    progress: Callable[[Iterable[TraceRecord], str], Iterable[TraceRecord]] | None = None,
) -> list[dict[str, Any]]:
    """Every policy at every capacity (None: unbounded); one result dict per run.

    The trace is read once to scan it, then once per run, streaming each time.
    """
    scan = scan_trace(records())
    results = []
    for policy in policies:
        for capacity in capacities:
            blocks = scan.num_sim_blocks if capacity is None else capacity
            replay = Replay(blocks, policy, cost, scan, tiers)
            stream = records()
            if progress is not None:
                stream = progress(stream, f"{policy} @ {blocks:,} blocks")
            result = replay.run(stream).to_dict(cost)
            result["unbounded"] = capacity is None
            results.append(result)
    return results
