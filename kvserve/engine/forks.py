"""Requests that share KV blocks with another one, and requests held out of scheduling.

Forks share KV blocks instead of recomputing them (paged mode):

- `n > 1`: the first sample (the parent) prefills all but the last prompt token; then the
  others fork from it and every sample computes the last prompt token itself, writing into
  its own copy of the partial last block:

      prompt      [ p0 ......................... pP-2 | pP-1 ]
      parent      prefill (chunked as usual)            fork point F = P - 1
      samples     share blocks of [0, F) ------------>  each computes pP-1 and samples

  Until the fork point the samples wait here, in no scheduler queue.
- beam search: `copy` forks a request whose newest token is not computed yet; the copy shares
  every block and may replace that newest token.
- holds: beam search holds a beam (not scheduled) until its whole group has its logprobs; a
  held request keeps its blocks and may still be preempted.

This module keeps the bookkeeping and shares the blocks; the scheduler places the requests it
returns in its queues.
"""

from __future__ import annotations

from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.request import Request, RequestStatus


class Forks:
    """Pending `n > 1` samples (parent id -> samples) and held request ids."""

    def __init__(self, kv_cache_manager: KVCacheManager) -> None:
        self.kv_cache_manager = kv_cache_manager
        self._pending: dict[str, list[Request]] = {}
        self._held: set[str] = set()

    # ---- n > 1 samples ---------------------------------------------------------------------

    def can_share(self, requests: list[Request], max_num_seqs: int) -> bool:
        """Whether the samples of one request can fork from the first: the paged cache and
        room for the whole group among `max_num_seqs`."""
        return (
            len(requests) > 1
            and self.kv_cache_manager.cache_mode == "paged"
            and len(requests) <= max_num_seqs
        )

    def add_pending(self, parent: Request, children: list[Request]) -> None:
        """Keep the samples until the parent reaches its fork point."""
        self._pending[parent.request_id] = list(children)

    def group_size(self, request: Request) -> int:
        """The request and the samples that will fork from it."""
        return 1 + len(self._pending.get(request.request_id, ()))

    def fork_point(self, request: Request) -> int | None:
        """Where the request's samples fork (its last prompt token), None if it has none."""
        if request.request_id not in self._pending:
            return None
        return request.num_prompt_tokens - 1

    def at_fork_point(self, request: Request) -> bool:
        return request.num_computed_tokens == self.fork_point(request)

    def fork_pending(self, parent: Request) -> list[Request]:
        """Fork the parent's samples: each takes its progress and shares its blocks.

        Returns the samples, RUNNING, for the scheduler to place right after the parent.
        They may run in the same step: the blocks they share hold tokens computed in earlier
        steps only, so copy-on-write copies finished K/V.
        """
        children = self._pending.pop(parent.request_id, [])
        for child in children:
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            child.num_cached_tokens_by_tier = dict(parent.num_cached_tokens_by_tier)
            child.num_prompt_logprobs_scheduled = parent.num_prompt_logprobs_scheduled
            child.first_scheduled_time = parent.first_scheduled_time
            self._share(parent, child)
        return children

    def take_orphans(self, parent: Request) -> list[Request]:
        """The samples of a parent that ended before their fork point; they run alone."""
        return self._pending.pop(parent.request_id, [])

    def remove_pending(self, request: Request) -> bool:
        """Drop one sample that has not forked yet; False if it is not one."""
        for parent_id, children in self._pending.items():
            if request in children:
                children.remove(request)
                if not children:
                    del self._pending[parent_id]
                return True
        return False

    # ---- beam search -----------------------------------------------------------------------

    def copy(self, parent: Request, child_id: str, last_token_id: int) -> Request:
        """A copy of `parent` whose newest (uncomputed) token is `last_token_id`.

        A RUNNING parent's copy shares every block and is RUNNING. No block is copied now:
        the first write into a shared block copies it (see `KVCacheManager.fork`). A
        preempted parent has no blocks: its copy takes its status and recomputes too.

        Raises:
            ValueError: the parent's newest token is already computed.
        """
        child = parent.copy(child_id)
        child.replace_last_token(last_token_id)
        if parent.status == RequestStatus.RUNNING:
            self._share(parent, child)
        else:
            child.status = parent.status
        return child

    # ---- holds -----------------------------------------------------------------------------

    def hold(self, request_id: str) -> None:
        self._held.add(request_id)

    def release(self, request_id: str) -> None:
        self._held.discard(request_id)

    def is_held(self, request: Request) -> bool:
        return request.request_id in self._held

    # ---- checks ----------------------------------------------------------------------------

    def pending_ids(self) -> set[str]:
        return {child.request_id for children in self._pending.values() for child in children}

    def check_invariants(self, queued_ids: set[str]) -> None:
        """Pending samples are in no queue and their parents are; holds name queued ids."""
        pending_ids = self.pending_ids()
        if pending_ids & queued_ids:
            raise AssertionError(f"forks both pending and queued: {pending_ids & queued_ids}")
        if not set(self._pending) <= queued_ids:
            raise AssertionError("a pending fork's parent is neither running nor waiting")
        if not self._held <= queued_ids:
            raise AssertionError(f"held requests not queued: {self._held - queued_ids}")

    def _share(self, parent: Request, child: Request) -> None:
        self.kv_cache_manager.fork(parent, child)
        child.status = RequestStatus.RUNNING
