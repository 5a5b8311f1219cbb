"""`kvserve serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over `AsyncEngine`.

    GET  /health               200 while the server runs
    GET  /metrics              Prometheus text (kvserve/server/metrics.py)
    GET  /v1/models            the one served model
    POST /v1/completions       prompt (text or token ids) -> text, streamed with "stream": true
    POST /v1/chat/completions  messages (the model's chat template) -> message, streamed

Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for invalid
input (malformed JSON, wrong types, a prompt longer than the context), 401 for a missing or
wrong API key when one is set, 404 for an unknown model, 429 (with Retry-After) when more than
`--max-queue-len` requests wait.
Streaming is server-sent events, one chunk per engine step that produced text, then
`data: [DONE]`. A client that disconnects mid-stream aborts its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from kvserve.outputs import RequestOutput
from kvserve.server import protocol
from kvserve.server.async_engine import AsyncEngine, EngineDeadError
from kvserve.server.metrics import ServerMetrics
from kvserve.server.protocol import ChatCompletionRequest, CompletionRequest
from kvserve.tokenizer import apply_chat_template

logger = logging.getLogger("kvserve")


class Rejected(Exception):
    """A request turned away before any work: 401 (API key) or 429 (overloaded)."""

    def __init__(
        self, status: int, message: str, kind: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


class ModelNotFound(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(f"model {name!r} does not exist")


def build_app(
    engine: AsyncEngine,
    model_name: str,
    api_key: str | None = None,
    max_queue_len: int | None = None,
) -> FastAPI:
    """The app. `api_key` guards /v1/*; past `max_queue_len` waiting requests, answer 429."""
    app = FastAPI(title="kvserve", docs_url=None, redoc_url=None)
    metrics = ServerMetrics(engine.get_metrics, model_name)
    _add_error_handlers(app)

    def admit(request: Request) -> None:
        """API key, then the waiting-queue limit (POST only); raises Rejected."""
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise Rejected(401, "invalid or missing API key", "authentication_error")
        # the requests that would wait with this one admitted: all but max_num_seqs
        would_wait = engine.num_unfinished + 1 - engine.engine.config.max_num_seqs
        if max_queue_len is not None and request.method == "POST" and would_wait > max_queue_len:
            message = f"{would_wait - 1} requests are already waiting; retry later"
            raise Rejected(429, message, "overloaded", headers={"Retry-After": "1"})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        admit(request)
        card = {
            "id": model_name,
            "object": "model",
            "created": protocol.now(),
            "owned_by": "kvserve",
        }
        card["max_model_len"] = engine.max_model_len
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        admit(request)
        _check_model(body.model, model_name)
        params = body.sampling_params(
            16 if body.max_tokens is None else body.max_tokens, body.logprobs
        )
        prompt = body.single_prompt()
        request_id = engine.new_request_id("cmpl")
        stream = metrics.track(engine.generate(request_id, prompt, params))
        first = await _first(stream)  # validation errors surface here, before any byte is sent
        if body.stream:
            return _sse(_completion_chunks(model_name, body, request_id, first, stream))
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

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        admit(request)
        _check_model(body.model, model_name)
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
        stream = metrics.track(engine.generate(request_id, prompt_ids, params))
        first = await _first(stream)
        if body.stream:
            return _sse(_chat_chunks(model_name, body, request_id, first, stream))
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

    return app


def _check_model(requested: str | None, served: str) -> None:
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


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
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


async def _completion_chunks(
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


async def _chat_chunks(
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


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg", error))
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(ValueError)
    async def bad_value(_: Request, error: ValueError) -> JSONResponse:
        message = str(error)
        param = message.split(":", 1)[0] if ":" in message else None
        if param is not None and " " in param:
            param = None
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(Rejected)
    async def rejected(_: Request, error: Rejected) -> JSONResponse:
        reply = _error(error.status, str(error), error.kind)
        reply.headers.update(error.headers)
        return reply

    @app.exception_handler(ModelNotFound)
    async def unknown_model(_: Request, error: ModelNotFound) -> JSONResponse:
        return _error(404, str(error), "invalid_request_error", "model", "model_not_found")

    @app.exception_handler(EngineDeadError)
    async def engine_failed(_: Request, error: EngineDeadError) -> JSONResponse:
        return _error(500, f"the engine failed: {error}", "internal_server_error")


def _error(
    status: int, message: str, kind: str, param: str | None = None, code: Any = None
) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, kind, param, code), status_code=status)


def _banner(model: str, host: str, port: int, api_key: str | None) -> str:
    """How to call the server: a curl line and a Python snippet, ready to paste."""
    base = f"http://{host}:{port}/v1"
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64}
    )
    key = api_key or "none"
    return (
        f"kvserve: serving {model} at {base} (Ctrl-C to stop)\n"
        f"  curl {base}/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n"
        f"  python -c 'from openai import OpenAI; "
        f'c = OpenAI(base_url="{base}", api_key="{key}"); '
        f'print(c.chat.completions.create(model="{model}", '
        f'messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)\''
    )


def serve(
    engine: AsyncEngine,
    model_name: str,
    host: str,
    port: int,
    api_key: str | None = None,
    max_queue_len: int | None = None,
) -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn stops accepting and lets in-flight
    requests finish), then stop the engine loop."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown (exit status -15); a server
        that stopped as asked should exit 0."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            signals = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    app = build_app(engine, model_name, api_key, max_queue_len)
    print(_banner(model_name, host, port, api_key), file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning")
    try:
        Server(config).run()
    finally:
        engine.shutdown()
