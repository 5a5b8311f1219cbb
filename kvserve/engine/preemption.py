"""What happens to a preempted request's KV blocks (`EngineConfig.preemption_mode`).

The scheduler picks the victim (the newest running request), takes it out of `running`, asks
the strategy to release its blocks, and queues it at the head of the waiting queue. It comes
back through ordinary admission: `KVCacheManager.get_computed_blocks` finds whatever of its
K/V survived (in the pool, then in the tiers), and the request computes the rest.

    recompute   free the blocks now; they keep their hashes in the pool, so a resume may
                still hit the ones nobody reused (and, with a tier, load the ones its
                write-through saved), and recomputes the others
    swap        first order the victim's computed full blocks that no tier holds yet to be
                saved (`blocks_to_swap_out`), then free them; on resume the pool hit and the
                tier lookup find them all, unless a tier refused or evicted some

The partial last block (fewer than block_size tokens, so no hash to file it under) is not
swapped: its at most block_size - 1 computed tokens are recomputed on resume, in both modes.

The swap-out order travels in the step's `SchedulerOutput` (STYLE rule 13) and runs before
that step's loads and forward: the freed blocks may go to another request in the same step,
and the forward overwrites them (vLLM v0 swapped out before the forward for the same reason).
Both strategies count what a preemption cost (`PreemptionStats`): blocks swapped out, blocks
loaded back on resume, and tokens computed again.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.kv.kv_transfer import BlockTransfer
from kvserve.request import Request


class PreemptionStats(NamedTuple):
    """Cumulative counters of what preemptions cost (see `kvserve.outputs.EngineMetrics`)."""

    num_swapped_out_blocks: int  # blocks saved to a tier at preemption (swap only)
    num_swapped_in_blocks: int  # blocks a resumed request loaded from a tier
    num_recomputed_tokens: int  # tokens computed before a preemption and again after it


class PreemptionStrategy(Protocol):
    """Releases a preempted request's KV blocks so that admission can resume it later, and
    counts what that cost."""

    @property
    def stats(self) -> PreemptionStats: ...

    def preempt(self, request: Request) -> None:
        """Take the request's blocks out of the pool and reset its progress.

        Called once the scheduler has removed `request` from `running`; afterwards the
        request holds no block and `num_computed_tokens` is 0 (admission sets it again from
        what `get_computed_blocks` finds).
        """
        ...

    def resume(self, request: Request, num_hit_tokens: int, num_loaded_blocks: int) -> None:
        """A request was admitted with `num_hit_tokens` found (`num_loaded_blocks` of them
        from a tier); if it was a victim, count what it computes again. A no-op otherwise."""
        ...

    def forget(self, request_id: str) -> None:
        """The request ended (finished or aborted); a no-op if it was not a waiting victim."""
        ...

    def take_blocks_to_swap_out(self) -> list[BlockTransfer]:
        """Blocks to save before the next step's loads and forward; clears them."""
        ...

    def check_invariants(self, waiting_ids: set[str]) -> None:
        """Raise AssertionError unless every victim still counted is waiting."""
        ...


class RecomputePreemption:
    """Drop the victim's K/V; it is recomputed (or hit in the prefix cache) on resume.

    Keeps what each waiting victim had computed, so that its resume can count the tokens
    computed again (`SwapPreemption` extends it).
    """

    def __init__(self, kv_cache_manager: KVCacheManager) -> None:
        self.kv_cache_manager = kv_cache_manager
        self.num_swapped_out_blocks = 0
        self.num_swapped_in_blocks = 0
        self.num_recomputed_tokens = 0
        self._num_lost_tokens: dict[str, int] = {}  # waiting victim -> tokens it had computed
        self._blocks_to_swap_out: list[BlockTransfer] = []

    @property
    def stats(self) -> PreemptionStats:
        return PreemptionStats(
            self.num_swapped_out_blocks, self.num_swapped_in_blocks, self.num_recomputed_tokens
        )

    def preempt(self, request: Request) -> None:
        self._num_lost_tokens[request.request_id] = request.num_computed_tokens
        self._release(request)
        request.num_computed_tokens = 0

    def resume(self, request: Request, num_hit_tokens: int, num_loaded_blocks: int) -> None:
        num_lost = self._num_lost_tokens.pop(request.request_id, None)
        if num_lost is None:
            return
        self.num_swapped_in_blocks += num_loaded_blocks
        self.num_recomputed_tokens += max(0, num_lost - num_hit_tokens)

    def forget(self, request_id: str) -> None:
        self._num_lost_tokens.pop(request_id, None)

    def take_blocks_to_swap_out(self) -> list[BlockTransfer]:
        blocks, self._blocks_to_swap_out = self._blocks_to_swap_out, []
        return blocks

    def check_invariants(self, waiting_ids: set[str]) -> None:
        if not set(self._num_lost_tokens) <= waiting_ids:
            raise AssertionError("a preempted request in the ledger is not waiting")

    def _release(self, request: Request) -> None:
        self.kv_cache_manager.free(request)


class SwapPreemption(RecomputePreemption):
    """Save the victim's full blocks that no tier holds yet, then free them (as recompute).

    The saves are orders (`take_blocks_to_swap_out`); blocks a tier refuses are recomputed
    on resume, so outputs never depend on what the tiers kept.

    Raises:
        ValueError: the KV cache manager has no connector to swap to.
    """

    def __init__(self, kv_cache_manager: KVCacheManager) -> None:
        if kv_cache_manager.connector is None:
            raise ValueError("preemption_mode: 'swap' needs a KV tier to swap blocks to")
        super().__init__(kv_cache_manager)

    def _release(self, request: Request) -> None:
        blocks = self.kv_cache_manager.get_blocks_to_swap_out(request)
        self._blocks_to_swap_out.extend(blocks)
        self.num_swapped_out_blocks += len(blocks)
        self.kv_cache_manager.free(request)


def make_preemption_strategy(mode: str, kv_cache_manager: KVCacheManager) -> PreemptionStrategy:
    """The strategy of `preemption_mode`.

    Raises:
        ValueError: the mode is neither "recompute" nor "swap", or it is "swap" and the KV
            cache manager has no connector (no tier).
    """
    if mode == "recompute":
        return RecomputePreemption(kv_cache_manager)
    if mode == "swap":
        return SwapPreemption(kv_cache_manager)
    raise ValueError(f"preemption_mode: must be 'recompute' or 'swap', got {mode!r}")
