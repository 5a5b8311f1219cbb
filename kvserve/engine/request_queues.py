"""Where each request of the scheduler is, and the moves between those places.

    add_request ──> waiting ──(Scheduler.schedule admits)──> running ──> finished (gone)
                       ▲                                        │
                       └──────── preempted (head of queue) ◄────┘

Forks share KV blocks instead of recomputing them (paged mode):

- `add_request_group` queues the samples of an `n > 1` request: the first (the parent)
  prefills all but the last prompt token, then the others fork from it and every sample
  computes the last prompt token itself, writing into its own copy of the partial last block:

      prompt      [ p0 ......................... pP-2 | pP-1 ]
      parent      prefill (chunked as usual)            fork point F = P - 1
      samples     share blocks of [0, F) ------------>  each computes pP-1 and samples

  Until the fork point the samples sit in `PendingForks` (engine/forks.py), in no queue.
- `fork_request` copies a running request whose newest token is not computed yet (beam
  search): the copy shares every block and may replace that newest token.

The policy (which requests run each step, how many tokens each) is the scheduler's.
"""

from __future__ import annotations

from collections import deque

from kvserve.engine.forks import PendingForks
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.request import Request, RequestStatus


class RequestQueues:
    """The scheduler's requests: waiting, running, pending forks and held ones.

    Invariant: every request of `requests` is in exactly one of `waiting`, `running` and the
    pending forks; a running request holds KV blocks, a waiting or pending one holds none.
    """

    def __init__(self, kv_cache_manager: KVCacheManager, max_num_seqs: int) -> None:
        self.kv_cache_manager = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._pending_forks = PendingForks()
        # Requests not to schedule for now (beam search holds a beam until its group moves
        # on); they keep their blocks and may still be preempted.
        self.held: set[str] = set()

    def add_request(self, request: Request) -> None:
        """Queue a validated request (the engine checks lengths and ids before this)."""
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def add_request_group(self, requests: list[Request]) -> None:
        """Queue the samples of one `n > 1` request so that they share the prompt's blocks.

        Sharing needs the paged cache and room for the whole group among `max_num_seqs`;
        otherwise the samples run as independent requests (prefix caching still shares
        their full prompt blocks).
        """
        parent, children = requests[0], requests[1:]
        sharing = self.kv_cache_manager.cache_mode == "paged"
        if not children or not sharing or len(requests) > self.max_num_seqs:
            for request in requests:
                self.add_request(request)
            return
        self.add_request(parent)
        for child in children:
            self.requests[child.request_id] = child
        self._pending_forks.add(parent, children)

    def fork_request(self, parent_id: str, child_id: str, last_token_id: int) -> Request:
        """A copy of a request that shares all its blocks (beam search).

        The parent's newest token must not be computed yet (it was just sampled); the copy
        takes `last_token_id` in its place. No block is copied now: the first write into a
        shared block copies it (see `KVCacheManager.fork`). A preempted parent has no blocks:
        its copy waits right behind it and recomputes too.

        Raises:
            ValueError: the parent is unknown or finished, the child id exists, or the
                parent's newest token is already computed.
        """
        parent = self.requests.get(parent_id)
        if parent is None or parent.is_finished:
            raise ValueError(f"request_id: cannot fork {parent_id!r}, it is not in the scheduler")
        if child_id in self.requests:
            raise ValueError(f"request_id: {child_id!r} already exists")
        child = parent.copy(child_id)
        child.replace_last_token(last_token_id)
        if parent.status == RequestStatus.RUNNING:
            self._fork(parent, child)
            self.running.append(child)
        else:  # preempted: nothing to share, the copy recomputes like its parent
            child.status = parent.status
            self.requests[child_id] = child
            self.waiting.insert(self.waiting.index(parent) + 1, child)
        return child

    def preempt_held(self) -> int:
        """Preempt every held running request (newest first) to free its blocks.

        For a driver whose held requests starve the others of KV blocks. Returns how many
        were preempted.
        """
        victims = [r for r in reversed(self.running) if r.request_id in self.held]
        for request in victims:
            self._preempt(request)
        return len(victims)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def _fork_pending(self, parent: Request, position: int) -> None:
        """Fork the parent's waiting samples into `running` right after the parent.

        They are scheduled in this same step: the blocks they share hold tokens computed in
        earlier steps only, so copy-on-write copies finished K/V.
        """
        children = self._pending_forks.take(parent.request_id)
        for child in children:
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            child.num_prompt_logprobs_scheduled = parent.num_prompt_logprobs_scheduled
            child.first_scheduled_time = parent.first_scheduled_time
            self._fork(parent, child)
        self.running[position:position] = children

    def _fork(self, parent: Request, child: Request) -> None:
        self.kv_cache_manager.fork(parent, child)
        child.status = RequestStatus.RUNNING
        self.requests[child.request_id] = child

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _remove(self, request: Request, status: RequestStatus) -> None:
        """End an unfinished request: take it out of its queue, free its blocks, forget it."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif not self._pending_forks.remove(request):
            self.waiting.remove(request)
        self.held.discard(request.request_id)
        # A parent that ends before its samples forked leaves them to run on their own.
        for child in reversed(self._pending_forks.take(request.request_id)):
            self.waiting.appendleft(child)
        request.status = status
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]

    def check_invariants(self) -> None:
        """Request lists agree with each other (the KV cache manager is the caller's)."""
        running_ids = {r.request_id for r in self.running}
        waiting_ids = {r.request_id for r in self.waiting}
        pending_ids = self._pending_forks.child_ids()
        if running_ids & waiting_ids:
            raise AssertionError(f"requests both running and waiting: {running_ids & waiting_ids}")
        if pending_ids & (running_ids | waiting_ids):
            raise AssertionError(f"forks both pending and queued: {pending_ids}")
        if not self._pending_forks.parent_ids() <= running_ids | waiting_ids:
            raise AssertionError("a pending fork's parent is neither running nor waiting")
        if running_ids | waiting_ids | pending_ids != set(self.requests):
            raise AssertionError("scheduler request map disagrees with its queues")
        if len(self.running) > self.max_num_seqs:
            raise AssertionError("more running requests than max_num_seqs")
        for request in self.running:
            if request.status != RequestStatus.RUNNING:
                raise AssertionError(f"{request} in running list")
