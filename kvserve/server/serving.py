"""The two generation routes: a parsed request body in, an OpenAI response (or SSE stream) out.

body --sampling params--> AsyncEngine.generate --> outputs --> JSON (or SSE chunks)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from kvserve.outputs import RequestOutput
from kvserve.server import protocol, streaming
from kvserve.server.async_engine import AsyncEngine
from kvserve.server.errors import ModelNotFound
from kvserve.server.metrics import ServerMetrics
from kvserve.server.protocol import ChatCompletionRequest, CompletionRequest
from kvserve.tokenizer import apply_chat_template


@dataclass
class Serving:
    """What the routes share: the engine, the served model's name and the metrics."""

    engine: AsyncEngine
    model_name: str
    metrics: ServerMetrics
    limits: Any = None  # ServerLimits (kvserve/server/limits.py), passed by build_app

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        """POST /v1/completions."""
        engine, model_name = self.engine, self.model_name
        check_model(body.model, model_name)
        params = body.sampling_params(
            16 if body.max_tokens is None else body.max_tokens, body.logprobs
        )
        prompt = body.single_prompt()
        request_id = engine.new_request_id("cmpl")
        stream = self.metrics.track(engine.generate(request_id, prompt, params))
        first = await _first(stream)  # validation errors surface here, before any byte is sent
        if body.stream:
            return streaming.sse(
                streaming.completion_chunks(model_name, body, request_id, first, stream)
            )
        final = await _last_or_hang_up(request, first, stream)
        if final is None:
            return Response(status_code=499)  # nobody is listening
        choices = [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": protocol.completion_logprobs(c, engine.tokenizer),
                "finish_reason": c.finish_reason,
            }
            for c in final.outputs
        ]
        return _response(request_id, "text_completion", model_name, choices, final)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Any:
        """POST /v1/chat/completions."""
        engine, model_name = self.engine, self.model_name
        check_model(body.model, model_name)
        max_tokens = body.max_completion_tokens or body.max_tokens
        top = body.top_logprobs or 0
        params = body.sampling_params(max_tokens, max(top, 1) if body.logprobs else None)
        if not body.messages:
            raise ValueError("messages: must contain at least one message")
        if engine.tokenizer is None:
            raise ValueError("messages: this model has no tokenizer; use /v1/completions")
        conversation = [{"role": m.role, "content": m.text()} for m in body.messages]
        # Rendering the template and tokenizing take milliseconds: off the event loop.
        prompt_ids = await asyncio.to_thread(apply_chat_template, engine.tokenizer, conversation)
        request_id = engine.new_request_id("chatcmpl")
        stream = self.metrics.track(engine.generate(request_id, prompt_ids, params))
        first = await _first(stream)
        if body.stream:
            return streaming.sse(streaming.chat_chunks(model_name, body, request_id, first, stream))
        final = await _last_or_hang_up(request, first, stream)
        if final is None:
            return Response(status_code=499)  # nobody is listening
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": protocol.chat_logprobs(c, engine.tokenizer, top)
                if body.logprobs
                else None,
                "finish_reason": c.finish_reason,
            }
            for c in final.outputs
        ]
        return _response(request_id, "chat.completion", model_name, choices, final)


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise ModelNotFound(requested)


async def _first(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    return await stream.__anext__()


async def _last(first: RequestOutput, stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = first
    async for output in stream:
        last = output
    return last


async def _last_or_hang_up(
    request: Request, first: RequestOutput, stream: AsyncIterator[RequestOutput]
) -> RequestOutput | None:
    """The final output, or None if the client hung up first (the request is then aborted:
    cancelling the consumer closes the engine stream, which frees its blocks)."""
    task = asyncio.ensure_future(_last(first, stream))
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
    return task.result()


def _response(
    request_id: str, kind: str, model: str, choices: list[dict[str, Any]], final: RequestOutput
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": kind,
        "created": protocol.now(),
        "model": model,
        "choices": choices,
        "usage": protocol.usage(final),
    }
