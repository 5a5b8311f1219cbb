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

With `tiers`, blocks the pool evicts fall into lower tiers (`sim.tiers`), and the prefix run
continues through them: restored blocks are loaded instead of recomputed when that is faster.
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
from kvserve.request import Request
from kvserve.sampling_params import SamplingParams
from kvserve.sim.results import CostModel, SimResult
from kvserve.sim.tiers import LowerTiers, TierSpec
from kvserve.trace.records import TRACE_BLOCK_TOKENS, TraceRecord

Records = Callable[[], Iterable[TraceRecord]]  # a fresh iterator over the trace per call
_NEVER = float("inf")
_PARAMS = SamplingParams(max_tokens=1)


@dataclass
class TraceScan:
    """What one pass over the trace tells every replay: sizes and, for Belady, the future."""

    num_requests: int = 0
    num_sim_blocks: int = 0  # prompt + output blocks of all requests: an unbounded capacity
    next_access: array[float] = field(default_factory=lambda: array("d"))  # per prompt-block access


def scan_trace(records: Iterable[TraceRecord], block_tokens: int = TRACE_BLOCK_TOKENS) -> TraceScan:
    """Count blocks and link each prompt-block access to the next access of the same id."""
    scan = TraceScan()
    last_access: dict[int, int] = {}
    for record in records:
        scan.num_requests += 1
        scan.num_sim_blocks += len(record.hash_ids) + _num_output_blocks(record, block_tokens)
        for block_id in record.hash_ids:
            access = len(scan.next_access)
            scan.next_access.append(_NEVER)
            previous = last_access.get(block_id)
            if previous is not None:
                scan.next_access[previous] = float(access)
            last_access[block_id] = access
    return scan


def _num_output_blocks(record: TraceRecord, block_tokens: int) -> int:
    return max(1, -(-record.output_length // block_tokens))


@dataclass
class _Running:
    request: Request
    record: TraceRecord
    first_access: int  # index of its first prompt block in the trace's access sequence


class Replay:
    """One replay of a trace at one capacity under one eviction policy.

    Args:
        capacity_blocks: usable cache blocks (the pool has one more: the null block).
        policy: "lru", "fifo", "lfu" or "belady" (needs `scan.next_access`).
        cost: durations and K/V bytes.
        scan: from `scan_trace` (needed for "belady").
        tiers: lower tiers below the pool, for the multi-tier what-if.
        block_tokens: tokens per trace block.
    """

    def __init__(
        self,
        capacity_blocks: int,
        policy: str,
        cost: CostModel,
        scan: TraceScan | None = None,
        tiers: list[TierSpec] | None = None,
        block_tokens: int = TRACE_BLOCK_TOKENS,
    ) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks: must be >= 1, got {capacity_blocks}")
        if policy == "belady" and scan is None:
            raise ValueError("policy: 'belady' needs the trace scanned first (scan=)")
        self.cost = cost
        self.block_tokens = block_tokens
        self.result = SimResult(policy, capacity_blocks)
        self.lower = LowerTiers(tiers or [], cost, block_tokens)
        for spec in tiers or []:
            self.result.tier_hit_blocks[spec.name] = 0
            self.result.tier_hit_tokens[spec.name] = 0
            self.result.tier_saved_s[spec.name] = 0.0
        self._next_use: dict[bytes, float] = {}
        self._belady = policy == "belady"
        self._next_access = scan.next_access if scan is not None else array("d")
        self.manager = KVCacheManager(
            capacity_blocks + 1,
            1,
            max_model_len=1 << 40,
            eviction_policy=policy,
            next_use=self._lookup_next_use if policy == "belady" else None,
            on_evict=self.lower.put if tiers else None,
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
        num_outputs = _num_output_blocks(record, self.block_tokens)
        outputs = range(self._next_output_id, self._next_output_id - num_outputs, -1)
        self._next_output_id -= num_outputs
        request = Request(str(self.result.num_requests), [*record.hash_ids, *outputs], _PARAMS)
        entry = _Running(request, record, self._num_accesses)
        self._num_accesses += len(record.hash_ids)
        self.result.num_requests += 1
        self.result.prompt_blocks += len(record.hash_ids)
        self.result.prompt_tokens += record.input_length
        if request.num_tokens > self.manager.num_usable_blocks:
            self.result.num_rejected += 1
            return
        self._waiting.append(entry)
        self._admit_waiting(now)

    def _admit_waiting(self, now: float) -> None:
        while self._waiting and self._admit(self._waiting[0], now):
            entry = self._waiting.popleft()
            self.result.queue_wait_s.append(now - entry.record.timestamp_ms / 1000.0)

    def _finish_until(self, now: float) -> None:
        while self._running and self._running[0][0] <= now:
            finish, _, entry = heapq.heappop(self._running)
            self.manager.free(entry.request)
            self._admit_waiting(finish)

    def _admit(self, entry: _Running, now: float) -> bool:
        request, record = entry.request, entry.record
        hit_blocks, _ = self.manager.get_computed_blocks(request)
        if self._belady:
            self._record_future(entry, len(hit_blocks))
        num_new = request.num_tokens - len(hit_blocks)
        if self.manager.allocate_slots(request, num_new, hit_blocks) is None:
            return False
        num_hit = len(hit_blocks)
        hit_tokens = sum(self._block_tokens(record, j) for j in range(num_hit))
        restored_tokens, load_s = self._restore(entry, num_hit)
        self.result.hit_blocks += num_hit
        self.result.hit_tokens += hit_tokens
        used = self.manager.num_used_blocks
        self.result.peak_used_blocks = max(self.result.peak_used_blocks, used)
        prefill = record.input_length - hit_tokens - restored_tokens
        duration = self.cost.prefill_s(prefill) + load_s + self.cost.decode_s(record.output_length)
        heapq.heappush(self._running, (now + duration, next(self._admissions), entry))
        return True

    def _record_future(self, entry: _Running, num_hit: int) -> None:
        """Belady: this request's prompt blocks are next used at their next access."""
        hashes = entry.request.block_hashes
        pool = self.manager.pool
        for j in range(len(entry.record.hash_ids)):
            self._next_use[hashes[j]] = self._next_access[entry.first_access + j]
            if j >= num_hit:  # cached elsewhere but not reachable now: its future moved
                pool.refresh_priority(hashes[j])

    def _restore(self, entry: _Running, num_hit: int) -> tuple[int, float]:
        """Continue the prefix run through the lower tiers: (tokens restored, load seconds)."""
        if not self.lower.tiers:
            return 0, 0.0
        restored_tokens, load_s = 0, 0.0
        hashes, record = entry.request.block_hashes, entry.record
        for j in range(num_hit, len(record.hash_ids)):
            tier = self.lower.find(hashes[j])
            if tier is None:
                break
            tokens = self._block_tokens(record, j)
            block_load_s = self.lower.load_s(tier, tokens)
            if block_load_s >= self.cost.prefill_s(tokens):
                break  # recomputing is faster: the engine would not restore
            restored_tokens += tokens
            load_s += block_load_s
            self.result.tier_hit_blocks[tier.name] += 1
            self.result.tier_hit_tokens[tier.name] += tokens
            self.result.tier_saved_s[tier.name] += self.cost.prefill_s(tokens) - block_load_s
        return restored_tokens, load_s

    def _block_tokens(self, record: TraceRecord, position: int) -> int:
        return min(self.block_tokens, record.input_length - position * self.block_tokens)


def simulate(
    records: Records,
    capacities: list[int | None],
    policies: list[str],
    cost: CostModel,
    tiers: list[TierSpec] | None = None,
    block_tokens: int = TRACE_BLOCK_TOKENS,
    progress: Callable[[Iterable[TraceRecord], str], Iterable[TraceRecord]] | None = None,
) -> list[dict[str, Any]]:
    """Every policy at every capacity (None: unbounded); one result dict per run.

    The trace is read once to scan it, then once per run, streaming each time.
    """
    scan = scan_trace(records(), block_tokens)
    results = []
    for policy in policies:
        for capacity in capacities:
            blocks = scan.num_sim_blocks if capacity is None else capacity
            replay = Replay(blocks, policy, cost, scan, tiers, block_tokens)
            stream = records()
            if progress is not None:
                stream = progress(stream, f"{policy} @ {blocks:,} blocks")
            result = replay.run(stream).to_dict(cost)
            result["unbounded"] = capacity is None
            results.append(result)
    return results
