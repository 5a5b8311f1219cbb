"""The waiting queue: requests in the order the scheduler considers them for admission.

First come, first served: `push` appends, `prepend` puts a request back at the head (a
preempted request resumes before anything newer). A priority queue would keep the same
methods and order by (priority, arrival) instead; the scheduler only uses this interface.

No stall, no starvation. Each step the scheduler walks the queue in order and admits what
fits. A request that does not fit (token budget, KV blocks, room for its `n > 1` group) does
not stop smaller requests behind it, but only in `max_bypass_steps` steps in which one of them
was admitted past it; from then on nothing behind it is admitted until it fits:

    step   queue (head first)     head fits?   admitted
    1      A(big) b c             no           b c        A passed over: 1
    ...
    K+1    A(big) d e             no           -          A has been passed K times: wait
    K+2    A(big) d e             yes          A d e
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from kvserve.request import Request


class RequestQueue:
    """FCFS queue of waiting requests, with the bounded bypass rule above.

    Args:
        max_bypass_steps: steps in which later requests may be admitted past one that does
            not fit (0: strict FCFS, the first request that does not fit stops admission).

    Raises:
        ValueError: max_bypass_steps < 0.
    """

    def __init__(self, max_bypass_steps: int) -> None:
        if max_bypass_steps < 0:
            raise ValueError(f"max_bypass_steps: must be >= 0, got {max_bypass_steps}")
        self.max_bypass_steps = max_bypass_steps
        self._requests: deque[Request] = deque()
        self._num_bypass_steps: dict[str, int] = {}  # request id -> steps it was passed over
        self._blocked: Request | None = None  # the first request that did not fit this step
        self._passed = False  # whether a request was admitted past it this step

    def push(self, request: Request) -> None:
        """Queue a request behind every other."""
        self._requests.append(request)

    def prepend(self, request: Request) -> None:
        """Put a request at the head (a preempted one, or a fork left without its parent)."""
        self._requests.appendleft(request)

    def insert_after(self, anchor: Request, request: Request) -> None:
        """Queue `request` right behind `anchor` (a copy of a preempted beam).

        Raises:
            ValueError: `anchor` is not in the queue.
        """
        self._requests.insert(self._requests.index(anchor) + 1, request)

    def peek(self) -> Request:
        """The head of the queue. Raises IndexError when empty."""
        return self._requests[0]

    def pop_front(self) -> Request:
        """Remove and return the head. Raises IndexError when empty."""
        request = self._requests.popleft()
        self._num_bypass_steps.pop(request.request_id, None)
        return request

    def remove(self, request: Request) -> None:
        """Take a request out wherever it is. Raises ValueError when it is not queued."""
        self._requests.remove(request)
        self._num_bypass_steps.pop(request.request_id, None)

    # ---- one admission pass (Scheduler._admit_waiting) --------------------------------------

    def start_admission(self) -> list[Request]:
        """Begin a step's admission pass; returns the requests to consider, in order."""
        self._blocked, self._passed = None, False
        return list(self._requests)

    def skip(self, request: Request) -> bool:
        """Note that `request` does not fit this step.

        Returns whether requests behind it may still be admitted in this step.
        """
        if self._blocked is not None:
            return True
        self._blocked = request
        return self._num_bypass_steps.get(request.request_id, 0) < self.max_bypass_steps

    def admit(self, request: Request) -> None:
        """Take an admitted request out; it passed the blocked one if there is one."""
        self.remove(request)
        self._passed = self._passed or self._blocked is not None

    def end_admission(self) -> None:
        """Count the step against the blocked request if a later one was admitted."""
        if self._blocked is not None and self._passed:
            blocked_id = self._blocked.request_id
            self._num_bypass_steps[blocked_id] = self._num_bypass_steps.get(blocked_id, 0) + 1
        self._blocked, self._passed = None, False

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)

    def __len__(self) -> int:
        return len(self._requests)

    def __bool__(self) -> bool:
        return bool(self._requests)
