"""What happens to a preempted request's KV blocks (`EngineConfig.preemption_mode`).

The scheduler picks the victim (the newest running request), takes it out of `running`, asks
the strategy to release its blocks, and queues it at the head of the waiting queue. It comes
back through ordinary admission: `KVCacheManager.get_computed_blocks` finds whatever of its
K/V survived, and the request computes the rest.

    recompute   free the blocks now; they keep their hashes in the pool, so a resume may
                still hit the ones nobody reused, and recomputes the others
    swap        (issue 17) name the victim's full blocks as blocks to save to the CPU tier,
                then free them; on resume the tier lookup names them as blocks to load

Both orders travel in the step's `SchedulerOutput` (STYLE rule 13). A swap's saves must run
before that step's forward: the freed blocks may go to another request in the same step, and
the forward overwrites them (vLLM v0 swapped out before the forward for the same reason).
"""

from __future__ import annotations

from typing import Protocol

from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.request import Request


class PreemptionStrategy(Protocol):
    """Releases a preempted request's KV blocks so that admission can resume it later."""

    def preempt(self, request: Request) -> None:
        """Take the request's blocks out of the pool and reset its progress.

        Called once the scheduler has removed `request` from `running`; afterwards the
        request holds no block and `num_computed_tokens` is 0 (admission sets it again from
        what `get_computed_blocks` finds).
        """
        ...


class RecomputePreemption:
    """Drop the victim's K/V; it is recomputed (or hit in the prefix cache) on resume."""

    def __init__(self, kv_cache_manager: KVCacheManager) -> None:
        self.kv_cache_manager = kv_cache_manager

    def preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.num_computed_tokens = 0


def make_preemption_strategy(mode: str, kv_cache_manager: KVCacheManager) -> PreemptionStrategy:
    """The strategy of `preemption_mode`.

    Raises:
        ValueError: the mode is not "recompute" (swap needs a CPU tier, issue 17).
    """
    if mode == "recompute":
        return RecomputePreemption(kv_cache_manager)
    raise ValueError(f"preemption_mode: must be 'recompute' (swap needs a CPU tier), got {mode!r}")
