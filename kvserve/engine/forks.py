"""The samples of `n > 1` requests that have not forked from their parent yet.

A parent prefills all but its last prompt token; at that point (the fork point) its samples
take a reference to each of its blocks and join the running requests (see request_queues.py).
Until then they wait here, outside the scheduler's queues.
"""

from __future__ import annotations

from kvserve.request import Request


class PendingForks:
    """parent request id -> its samples waiting for the fork point."""

    def __init__(self) -> None:
        self._children: dict[str, list[Request]] = {}

    def add(self, parent: Request, children: list[Request]) -> None:
        self._children[parent.request_id] = list(children)

    def group_size(self, request: Request) -> int:
        """The request and the samples that will fork from it."""
        return 1 + len(self._children.get(request.request_id, ()))

    def fork_point(self, request: Request) -> int | None:
        """Where the request's samples fork (its last prompt token), None if it has none."""
        if request.request_id not in self._children:
            return None
        return request.num_prompt_tokens - 1

    def at_fork_point(self, request: Request) -> bool:
        return request.num_computed_tokens == self.fork_point(request)

    def take(self, parent_id: str) -> list[Request]:
        """Remove and return a parent's samples ([] if it has none)."""
        return self._children.pop(parent_id, [])

    def remove(self, request: Request) -> bool:
        """Drop one sample that has not forked yet; False if it is not one."""
        for parent_id, children in self._children.items():
            if request in children:
                children.remove(request)
                if not children:
                    del self._children[parent_id]
                return True
        return False

    def parent_ids(self) -> set[str]:
        return set(self._children)

    def child_ids(self) -> set[str]:
        return {child.request_id for children in self._children.values() for child in children}
