"""What a user gets back from `LLM.generate` and the engine (vLLM's shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class Logprob(NamedTuple):
    """Log-probability of one candidate token; rank 1 is the most likely."""

    logprob: float
    rank: int
    decoded_token: str | None = None


# One dict per generated token: candidate token id -> Logprob (top-k plus the sampled one).
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token: None for the first (nothing precedes it), then a dict as above
# holding the prompt token's own logprob and the top-k (vLLM's `prompt_logprobs`).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One of the `n` sequences generated for a prompt."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.monotonic seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """The state of one prompt's generation; `finished` once every output is."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    prompt_logprobs: PromptLogprobs | None = None
    kv_block_ids: list[list[int]] = field(default_factory=list)
    # Where the cached tokens came from: "pool" (the prefix cache) and each tier ("cpu",
    # "disk", "redis"; "external" for a connector that is not a tier chain) -> tokens. Only
    # places that supplied tokens appear ({} when none did); the values sum to
    # num_cached_tokens.
    num_cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TierMetrics:
    """Cumulative counters of one KV tier below the pool ("cpu", "disk", "redis").

    A hit is one block read back from the tier at lookup, a miss one asked for and not there
    (or unreadable). Writes count blocks the tier stored; `dropped_writes` those the background
    writer never offered it (its queue was full); `rejected` values larger than the tier's
    whole budget; `errors` I/O failures. Load latency is the time to read and decode one block
    at lookup: its sum and count, and cumulative counts per bucket (upper bound in seconds).
    """

    hits: int
    misses: int
    bytes_read: int
    blocks_written: int
    bytes_written: int
    evictions: int
    errors: int
    rejected: int
    dropped_writes: int
    load_seconds_sum: float
    load_seconds_count: int
    load_seconds_buckets: tuple[tuple[float, int], ...]  # (bound, loads <= bound), ascending
    # what the tier holds now and its byte budget (zeros: a store that keeps no count, Redis,
    # bounded by its own maxmemory)
    blocks_held: int = 0
    bytes_held: int = 0
    capacity_bytes: int = 0


@dataclass(frozen=True)
class EngineMetrics:
    """A snapshot of the engine's gauges and cumulative counters (`LLM.get_metrics()`).

    Token counters are cumulative since the engine started; a Prometheus exporter turns them
    into counters and the rest into gauges. `prefix_cache_queries` counts the prompt tokens
    looked up in the prefix cache (once per request admission), `prefix_cache_hits` those
    found there.
    """

    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage: float  # fraction of usable KV blocks held by requests, in [0, 1]
    num_kv_blocks: int  # usable blocks (the null block excluded)
    num_kv_blocks_used: int
    num_kv_blocks_cached: int  # blocks holding a prefix-cache entry, used or free
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_evictions: int  # cached blocks reused for other tokens
    num_preemptions: int
    prompt_tokens: int  # prompt tokens of admitted requests
    computed_prompt_tokens: int  # prompt tokens the model computed (cache misses, recomputes)
    generation_tokens: int
    # KV tiers below the pool, by name in lookup order (empty without tiers), and the entries
    # found in some tier but corrupt, truncated or foreign (read as misses).
    kv_tiers: dict[str, TierMetrics] = field(default_factory=dict)
    kv_tier_unreadable: int = 0
    # Restore-or-recompute decisions (`kv_restore`), one per lookup that found a run in the
    # tiers (a request waiting several steps is decided each step): runs and their blocks,
    # by decision ("load", "recompute"); empty without tiers.
    kv_restore_runs: dict[str, int] = field(default_factory=dict)
    kv_restore_blocks: dict[str, int] = field(default_factory=dict)
    # Preemption costs (engine/preemption.py): blocks saved to a tier at preemption (swap),
    # blocks loaded back on resume, tokens computed again after a preemption (both modes).
    num_swapped_out_blocks: int = 0
    num_swapped_in_blocks: int = 0
    num_preempted_recomputed_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hits over queries, 0.0 before any query."""
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )
