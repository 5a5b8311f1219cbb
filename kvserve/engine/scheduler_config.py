"""The scheduler's limits (`SchedulerConfig`) and what it reports (`SchedulerStats`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class SchedulerConfig:
    """The resolved limits the scheduler enforces (see `kvserve.config.EngineConfig`).

    `max_bypass_steps`: in how many steps later requests may be admitted past a waiting
    request that does not fit; after that, nothing behind it is admitted until it fits.
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    preemption_mode: str = "recompute"
    max_bypass_steps: int = 4


class SchedulerStats(NamedTuple):
    """Request counts now, and cumulative token counters (see `kvserve.metrics`)."""

    num_running: int
    num_waiting: int
    num_preemptions: int
    kv_cache_usage: float
    num_prompt_tokens: int  # prompt tokens of every admitted request, counted once
    num_computed_prompt_tokens: int  # prompt positions computed (misses, recomputes)
    num_generation_tokens: int  # tokens sampled
    num_swapped_out_blocks: int  # preempted requests' blocks saved to a tier (swap)
    num_swapped_in_blocks: int  # resumed requests' blocks loaded from a tier
    num_preempted_recomputed_tokens: int  # tokens computed again after a preemption
