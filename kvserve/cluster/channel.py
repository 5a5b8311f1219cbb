"""The ingress's line to one replica: every request in flight there shares one `take`.

    stream(request_id, submit)          pump (one task a replica, while it has requests)
      queue registered                    take() in flight -> {request: [news]} each step
      submit() -> the replica's incarnation   deltas unpacked (wire.py) -> each request's queue
      items from the queue, until the      replica died (the call failed, or a take comes
        finished output or an error          back from a new incarnation): ReplicaLost to
      consumer gone: abort(request_id)       every request it had

One Ray call a step for all of a replica's requests, where a streaming call a request put
one Ray object per request per step (docs/benchmarks.md, "Ray's own overhead").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from ray.exceptions import RayActorError, RayTaskError

from kvserve.cluster.wire import OutputDelta, Unpacker
from kvserve.server.async_engine import EngineDeadError

logger = logging.getLogger("kvserve")

TAKE_WAIT_S = 1.0  # a take with no news returns after this: the pump rechecks the replica


class ReplicaLost(Exception):
    """The replica died (Ray restarts it) before the request ended."""


class _InFlight:
    """One request's place in the channel."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.incarnation: str | None = None  # known once submit answered
        self.unpacker = Unpacker()


class ReplicaChannel:
    """Requests in flight on replica `index` (`handle`); `on_down(index)` when it dies."""

    def __init__(self, handle: Any, index: int, on_down: Callable[[int], None]) -> None:
        self.handle = handle
        self.index = index
        self.on_down = on_down
        self._requests: dict[str, _InFlight] = {}
        self._pump: asyncio.Task[None] | None = None

    async def stream(
        self, request_id: str, submit: Callable[[], Awaitable[str]]
    ) -> AsyncGenerator[Any, None]:
        """Run `submit()` (a call of the replica's `submit`) and yield what the request
        brings (Handoff, cumulative RequestOutput) until its finished output.

        Raises:
            ReplicaLost: the replica died first.
            ValueError, EngineDeadError: what the replica reported for the request.
        """
        entry = self._requests[request_id] = _InFlight()
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())
        finished = False
        try:
            try:
                entry.incarnation = await submit()
            except RayActorError as error:
                raise ReplicaLost(str(error)) from error
            except RayTaskError as error:
                raise EngineDeadError(str(error)) from None
            while not finished:
                item = await entry.queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                if isinstance(item, OutputDelta):
                    item = entry.unpacker.unpack(item)
                    finished = item.finished
                yield item
        finally:
            del self._requests[request_id]
            if not finished:
                self.handle.abort.remote(request_id)  # frees its KV blocks there

    async def _run_pump(self) -> None:
        while self._requests:
            try:
                incarnation, news = await self.handle.take.remote(TAKE_WAIT_S)
            except RayActorError as error:
                self.on_down(self.index)
                self._fail_all(list(self._requests.values()), error)
                await asyncio.sleep(0.1)  # Ray is restarting it; calls wait meanwhile
                continue
            except RayTaskError as error:  # a bug in the replica: its requests cannot go on
                logger.error("engine replica %d: take failed: %s", self.index, error)
                for entry in self._requests.values():
                    entry.queue.put_nowait(EngineDeadError(str(error)))
                await asyncio.sleep(0.1)
                continue
            for request_id, items in news.items():
                if request_id in self._requests:
                    for item in items:
                        self._requests[request_id].queue.put_nowait(item)
            entries = self._requests.values()
            self._fail_all([e for e in entries if e.incarnation not in (None, incarnation)], None)

    def _fail_all(self, entries: list[_InFlight], cause: Exception | None) -> None:
        """End `entries` with ReplicaLost (the replica they ran on died)."""
        for entry in entries:
            lost = ReplicaLost(f"engine replica {self.index} died: {cause or 'restarted'}")
            entry.queue.put_nowait(lost)
