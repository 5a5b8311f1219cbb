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

import contextlib
import json
import logging
import signal
import sys
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from kvserve.server.async_engine import AsyncEngine
from kvserve.server.errors import Rejected, add_error_handlers
from kvserve.server.metrics import ServerMetrics
from kvserve.server.protocol import ChatCompletionRequest, CompletionRequest
from kvserve.server.serving import Serving, check_model

logger = logging.getLogger("kvserve")


def build_app(
    engine: AsyncEngine,
    model_name: str,
    api_key: str | None = None,
    max_queue_len: int | None = None,
) -> FastAPI:
    """The app. `api_key` guards /v1/*; past `max_queue_len` waiting requests, answer 429."""
    app = FastAPI(title="kvserve", docs_url=None, redoc_url=None)
    metrics = ServerMetrics(engine.get_metrics, model_name)
    serving = Serving(engine, model_name, metrics)
    add_error_handlers(app)

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
        return {"object": "list", "data": [serving.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        admit(request)
        check_model(model_id, model_name)
        return serving.model_card()

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        admit(request)
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        admit(request)
        return await serving.chat(body, request)

    return app


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
