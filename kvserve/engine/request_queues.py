"""Where each request of the scheduler is, and the moves between those places.

    add_request ──> waiting ──(Scheduler.schedule admits)──> running ──> finished (gone)
                       ▲                                        │
                       └──────── preempted (head of queue) ◄────┘

The waiting queue is a `RequestQueue` (engine/request_queue.py). What a preemption does to
the victim's KV blocks is the `PreemptionStrategy`'s (engine/preemption.py). Forks and holds
are kept by `Forks` (engine/forks.py); this class only places the requests they return. The
policy (which requests run each step, how many tokens each) is the scheduler's.
"""

from __future__ import annotations

from kvserve.engine.forks import Forks
from kvserve.engine.preemption import make_preemption_strategy
from kvserve.engine.request_queue import RequestQueue
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.request import Request, RequestStatus


class RequestQueues:
    """The scheduler's requests: waiting, running, and the `n > 1` samples not forked yet.

    Invariant: every request of `requests` is in exactly one of `waiting`, `running` and the
    pending forks; a running request holds KV blocks, a waiting or pending one holds none.
    """

    def __init__(
        self,
        kv_cache_manager: KVCacheManager,
        max_num_seqs: int,
        preemption_mode: str,
        max_bypass_steps: int,
    ) -> None:
        self.kv_cache_manager = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.preemption = make_preemption_strategy(preemption_mode, kv_cache_manager)
        self.forks = Forks(kv_cache_manager)
        self.requests: dict[str, Request] = {}
        self.waiting = RequestQueue(max_bypass_steps)
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        """Queue a validated request (the engine checks lengths and ids before this)."""
        self.requests[request.request_id] = request
        self.waiting.push(request)

    def add_request_group(self, requests: list[Request]) -> None:
        """Queue the samples of one `n > 1` request so that they share the prompt's blocks.

        Without sharing (see `Forks.can_share`) the samples run as independent requests
        (prefix caching still shares their full prompt blocks).
        """
        if not self.forks.can_share(requests, self.max_num_seqs):
            for request in requests:
                self.add_request(request)
            return
        parent, children = requests[0], requests[1:]
        self.add_request(parent)
        for child in children:
            self.requests[child.request_id] = child
        self.forks.add_pending(parent, children)

    def fork_request(self, parent_id: str, child_id: str, last_token_id: int) -> Request:
        """A copy of a request that shares all its blocks (beam search; see `Forks.copy`).

        Raises:
            ValueError: the parent is unknown or finished, the child id exists, or the
                parent's newest token is already computed.
        """
        parent = self.requests.get(parent_id)
        if parent is None:
            raise ValueError(f"request_id: cannot fork {parent_id!r}, it is not in the scheduler")
        if child_id in self.requests:
            raise ValueError(f"request_id: {child_id!r} already exists")
        child = self.forks.copy(parent, child_id, last_token_id)
        self.requests[child_id] = child
        if child.status == RequestStatus.RUNNING:
            self.running.append(child)
        else:  # a preempted parent's copy waits right behind it
            self.waiting.insert_after(parent, child)
        return child

    def replace_last_token(self, request_id: str, token_id: int) -> None:
        """Swap a request's newest output token before its K/V is computed (beam search).

        Raises:
            ValueError: the newest token is already computed (see `Request.replace_last_token`).
        """
        self.requests[request_id].replace_last_token(token_id)

    def hold(self, request_id: str) -> None:
        """Leave a request out of scheduling until `release` (a no-op once it finished).

        A held request keeps its blocks and may still be preempted (`preempt_held`).
        """
        if request_id in self.requests:
            self.forks.hold(request_id)

    def release(self, request_id: str) -> None:
        self.forks.release(request_id)

    def preempt_held(self) -> int:
        """Preempt every held running request (newest first) to free its blocks; returns how
        many. For a driver whose held requests starve the others of KV blocks."""
        victims = [r for r in reversed(self.running) if self.forks.is_held(r)]
        for request in victims:
            self._preempt(request)
        return len(victims)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def _fork_pending(self, parent: Request, position: int) -> None:
        """Place the parent's samples, forked now, in `running` at `position` (see
        `Forks.fork_pending`)."""
        self.running[position:position] = self.forks.fork_pending(parent)

    def _preempt(self, request: Request) -> None:
        """Move a running request to the head of the queue; the strategy releases its KV."""
        self.running.remove(request)
        self.preemption.preempt(request)
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend(request)

    def _remove(self, request: Request, status: RequestStatus) -> None:
        """End an unfinished request: take it out of its queue, free its blocks, forget it."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif not self.forks.remove_pending(request):
            self.waiting.remove(request)
        self.forks.release(request.request_id)
        # A parent that ends before its samples forked leaves them to run on their own.
        for child in reversed(self.forks.take_orphans(request)):
            self.waiting.prepend(child)
        request.status = status
        self.preemption.forget(request.request_id)
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]

    def check_invariants(self) -> None:
        """Request lists agree with each other (the KV cache manager is the caller's)."""
        running_ids = {r.request_id for r in self.running}
        waiting_ids = {r.request_id for r in self.waiting}
        if running_ids & waiting_ids:
            raise AssertionError(f"requests both running and waiting: {running_ids & waiting_ids}")
        self.forks.check_invariants(running_ids | waiting_ids)
        if running_ids | waiting_ids | self.forks.pending_ids() != set(self.requests):
            raise AssertionError("scheduler request map disagrees with its queues")
        if len(self.running) > self.max_num_seqs:
            raise AssertionError("more running requests than max_num_seqs")
        for request in self.running:
            if request.status != RequestStatus.RUNNING:
                raise AssertionError(f"{request} in running list")
