"""Both routes' streams as server-sent events (`data: {...}` ... `data: [DONE]`).

A stream sends one chunk per engine update that moved some choice: its new text, the new
tokens' logprobs when asked, and its finish reason once it has one. Several prompts' runs are
merged as their outputs arrive; a consumer that goes away (client disconnect) closes every
run, which aborts its engine request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, NamedTuple

from fastapi.responses import StreamingResponse

from kvserve.outputs import RequestOutput
from kvserve.server import responses
from kvserve.server.endpoints import Endpoint, Sent, unchanged
from kvserve.server.errors import error_body

logger = logging.getLogger("kvserve")


class Run(NamedTuple):
    """One prompt's engine request: its first output (already awaited) and the rest."""

    first: RequestOutput
    stream: AsyncGenerator[RequestOutput, None]


def sse(chunks: AsyncIterator[dict[str, Any]], request_id: str) -> StreamingResponse:
    """The chunks as SSE frames. A fault after the first byte cannot change the status code:
    it ends the stream with an OpenAI-shaped error event (logged with its traceback)."""

    async def frames() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as error:
            logger.exception("request %s failed while streaming", request_id)
            message = f"request {request_id} failed: {type(error).__name__}: {error}"
            body = error_body(message, "internal_server_error")
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")


async def merge(runs: list[Run]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) of every run as they arrive; closing this closes every run."""
    for index, run in enumerate(runs):
        yield index, run.first
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as error:  # surfaced to the consumer below
            queue.put_nowait((index, error))
        queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, run.stream)) for i, run in enumerate(runs)]
    try:
        remaining = len(runs)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def chunks(
    head: dict[str, Any], endpoint: Endpoint, runs: list[Run], include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    """The stream's chunks: `head` (id, object, created, model) plus the choices an update
    moved, formatted by `endpoint`; then the usage of every prompt when `include_usage`.

    A choice's first chunk waits for its first token or finish reason (an echoing
    completion sends the prompt at once).
    """
    sent: dict[tuple[int, int], Sent] = {}
    finals: dict[int, RequestOutput] = {}
    async for p, output in merge(runs):
        output = finals[p] = endpoint.shown(output)
        choices = []
        for c in output.outputs:
            before = sent.get((p, c.index))
            if unchanged(before, c):
                continue
            if before is None and not (c.token_ids or c.finish_reason or endpoint.echo):
                continue
            index = p * endpoint.n + c.index
            choice, sent[(p, c.index)] = endpoint.delta(index, output, c, before)
            choices.append(choice)
        if choices:
            yield {**head, "choices": choices}
    if include_usage:
        yield {**head, "choices": [], "usage": responses.usage(list(finals.values()))}
