"""Choices of both routes, whole or as server-sent events (`data: {...}` ... `data: [DONE]`).

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
from dataclasses import dataclass
from typing import Any, NamedTuple

from fastapi.responses import StreamingResponse

from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.server import responses
from kvserve.server.errors import error_body
from kvserve.server.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger("kvserve")


class Run(NamedTuple):
    """One prompt's engine request: its first output (already awaited) and the rest."""

    first: RequestOutput
    stream: AsyncGenerator[RequestOutput, None]


class Context(NamedTuple):
    request_id: str
    model: str
    tokenizer: Any


@dataclass(frozen=True)
class CompletionShape:
    """What a completion reply shows besides the text (from the request body)."""

    n: int
    echo: bool  # the prompt's text (and logprobs) before each choice's
    echo_only: bool  # max_tokens 0: the one token generated is not shown
    logprobs: int | None
    prompt_logprobs: bool  # vLLM's `prompt_logprobs` list on each choice

    def shown(self, output: RequestOutput) -> RequestOutput:
        """The output as the client sees it (without the generated token when echo_only)."""
        if not self.echo_only:
            return output
        hidden = [
            CompletionOutput(c.index, "", [], 0.0, [], c.finish_reason and "length")
            for c in output.outputs
        ]
        return RequestOutput(
            output.request_id, output.prompt, output.prompt_token_ids, hidden, output.finished,
            output.num_cached_tokens, output.metrics, output.prompt_logprobs,
        )  # fmt: skip


class _Sent(NamedTuple):
    """What a stream has sent of one choice (the next text offset for legacy logprobs)."""

    num_tokens: int
    num_chars: int
    finish_reason: str | None
    text_offset: int


def _unchanged(before: _Sent | None, c: CompletionOutput) -> bool:
    return before is not None and (before.num_tokens, before.finish_reason) == (
        len(c.token_ids),
        c.finish_reason,
    )


def completion_choice(
    tokenizer: Any, shape: CompletionShape, index: int, final: RequestOutput, c: CompletionOutput
) -> dict[str, Any]:
    """One whole choice of a /v1/completions reply."""
    choice = _completion_delta(tokenizer, shape, index, final, c, None)[0]
    if shape.prompt_logprobs:
        choice["prompt_logprobs"] = responses.prompt_logprobs_json(tokenizer, final)
    return choice


def chat_choice(tokenizer: Any, top: int | None, c: CompletionOutput) -> dict[str, Any]:
    """One whole choice of a /v1/chat/completions reply."""
    logprobs = None
    if top is not None and c.logprobs is not None:
        logprobs = responses.chat_logprobs(tokenizer, c.token_ids, c.logprobs, top)
    return {
        "index": c.index,
        "message": {"role": "assistant", "content": c.text},
        "logprobs": logprobs,
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
    }


def _completion_delta(
    tokenizer: Any,
    shape: CompletionShape,
    index: int,
    output: RequestOutput,
    c: CompletionOutput,
    before: _Sent | None,
) -> tuple[dict[str, Any], _Sent]:
    """The choice's part not sent yet (all of it, prompt included when echoing, if `before`
    is None), and what will have been sent after it.

    Text offsets count from the start of prompt + completion, as OpenAI's legacy API does.
    """
    first, prompt = before is None, ""
    if before is None:
        if shape.echo or shape.logprobs is not None:
            prompt = responses.prompt_text(tokenizer, output)
        before = _Sent(0, 0, None, 0 if shape.echo else len(prompt))
    token_ids: list[int] = list(c.token_ids[before.num_tokens :])
    # the engine may have appended to its logprobs list since this output was made
    entries: list[responses.Entry] = list((c.logprobs or [])[before.num_tokens : len(c.token_ids)])
    text = c.text[before.num_chars :]
    if first and shape.echo:
        text = prompt + text
        token_ids = list(output.prompt_token_ids) + token_ids
        entries = (output.prompt_logprobs or [None] * len(output.prompt_token_ids)) + entries
    choice: dict[str, Any] = {"index": index, "text": text, "logprobs": None}
    choice |= {"finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
    offset = before.text_offset
    if shape.logprobs is not None:
        choice["logprobs"] = logprobs = responses.legacy_logprobs(
            tokenizer, token_ids, entries, offset
        )
        offset += sum(len(token) for token in logprobs["tokens"])
    return choice, _Sent(len(c.token_ids), len(c.text), c.finish_reason, offset)


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


async def completion_chunks(
    ctx: Context, body: CompletionRequest, shape: CompletionShape, runs: list[Run]
) -> AsyncIterator[dict[str, Any]]:
    base = {"id": ctx.request_id, "object": "text_completion", "created": responses.now()}
    base["model"] = ctx.model
    sent: dict[tuple[int, int], _Sent] = {}
    finals: dict[int, RequestOutput] = {}
    async for p, output in merge(runs):
        output = finals[p] = shape.shown(output)
        choices = []
        for c in output.outputs:
            before = sent.get((p, c.index))
            if before is not None and (len(c.token_ids), c.finish_reason) == (
                before.num_tokens,
                before.finish_reason,
            ):
                continue
            if before is None and not c.token_ids and not c.finish_reason and not shape.echo:
                continue
            index = p * shape.n + c.index
            choice, sent[(p, c.index)] = _completion_delta(
                ctx.tokenizer, shape, index, output, c, before
            )
            choices.append(choice)
        if choices:
            yield {**base, "choices": choices}
    if body.stream_options and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": responses.usage(list(finals.values()))}


async def chat_chunks(
    ctx: Context, body: ChatCompletionRequest, top: int | None, runs: list[Run]
) -> AsyncIterator[dict[str, Any]]:
    base = {"id": ctx.request_id, "object": "chat.completion.chunk", "created": responses.now()}
    base["model"] = ctx.model
    sent: dict[int, _Sent] = {}
    final = runs[0].first
    async for _, output in merge(runs):
        final = output
        choices = []
        for c in output.outputs:
            before = sent.get(c.index)
            if before is not None and (len(c.token_ids), c.finish_reason) == (
                before.num_tokens,
                before.finish_reason,
            ):
                continue
            if before is None and not c.token_ids and not c.finish_reason:
                continue
            num_tokens, num_chars = (0, 0) if before is None else before[:2]
            delta: dict[str, Any] = {"content": c.text[num_chars:]}
            if before is None:
                delta = {"role": "assistant", **delta}
            choice = {"index": c.index, "delta": delta, "logprobs": None}
            choice |= {"finish_reason": c.finish_reason}
            if top is not None and c.logprobs is not None:
                new_ids = c.token_ids[num_tokens:]
                new_entries = c.logprobs[num_tokens : len(c.token_ids)]
                choice["logprobs"] = responses.chat_logprobs(
                    ctx.tokenizer, new_ids, new_entries, top
                )
            sent[c.index] = _Sent(len(c.token_ids), len(c.text), c.finish_reason, 0)
            choices.append(choice)
        if choices:
            yield {**base, "choices": choices}
    if body.stream_options and body.stream_options.include_usage:
        yield {**base, "choices": [], "usage": responses.usage([final])}
