"""Server-sent events: one chunk per engine update that produced text, then `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from kvserve.outputs import RequestOutput
from kvserve.server import protocol
from kvserve.server.protocol import ChatCompletionRequest, CompletionRequest


def sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def frames() -> AsyncIterator[str]:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")


async def _deltas(
    first: RequestOutput, stream: AsyncIterator[RequestOutput]
) -> AsyncIterator[tuple[RequestOutput, list[tuple[int, str, str | None]]]]:
    """Per engine update: (output, [(choice index, new text, finish_reason)]) of the choices
    that got a token or finished (the new text may be empty: held back for a stop string or
    an unfinished character, or a model without a tokenizer)."""
    sent: dict[int, tuple[int, str, str | None]] = {}

    async def updates() -> AsyncIterator[RequestOutput]:
        yield first
        async for output in stream:
            yield output

    async for output in updates():
        changed = []
        for c in output.outputs:
            num_tokens, text, reason = sent.get(c.index, (0, "", None))
            if len(c.token_ids) != num_tokens or c.finish_reason != reason:
                changed.append((c.index, c.text[len(text) :], c.finish_reason))
                sent[c.index] = (len(c.token_ids), c.text, c.finish_reason)
        yield output, changed


async def completion_chunks(
    model: str,
    body: CompletionRequest,
    request_id: str,
    first: RequestOutput,
    stream: AsyncIterator[RequestOutput],
) -> AsyncIterator[dict[str, Any]]:
    base = {"id": request_id, "object": "text_completion", "created": protocol.now()}
    base["model"] = model
    final = first
    async for output, changed in _deltas(first, stream):
        final = output
        if changed:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, t, r in changed]  # fmt: skip
            yield {**base, "choices": choices}
    if body.stream_options and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": protocol.usage(final)}


async def chat_chunks(
    model: str,
    body: ChatCompletionRequest,
    request_id: str,
    first: RequestOutput,
    stream: AsyncIterator[RequestOutput],
) -> AsyncIterator[dict[str, Any]]:
    base = {"id": request_id, "object": "chat.completion.chunk", "created": protocol.now()}
    base["model"] = model
    roles_sent: set[int] = set()
    final = first
    async for output, changed in _deltas(first, stream):
        final = output
        choices = []
        for index, text, reason in changed:
            delta: dict[str, Any] = {"content": text}
            if index not in roles_sent:
                delta["role"] = "assistant"
                roles_sent.add(index)
            choices.append({"index": index, "delta": delta, "finish_reason": reason})
        if choices:
            yield {**base, "choices": choices}
    if body.stream_options and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": protocol.usage(final)}
