"""The OpenAI-compatible app (FastAPI inside kvserve's ASGI layers) over an engine client
(`AsyncEngine`, or `kvserve cluster`'s replicas); launch.py runs it under uvicorn.

    GET|HEAD /health           200 while the server can answer, 503 when no engine replica
                               is up (never needs the API key)
    GET  /metrics              Prometheus text (kvserve/server/metrics.py)
    GET  /kv, /kv/state        the KV inspector: a live page of the cache, and its JSON
                               (server/inspector/)
    GET  /v1/models            the one served model
    POST /v1/completions       prompt (text or token ids) -> text, streamed with "stream": true
    POST /v1/chat/completions  messages (the model's chat template) -> message, streamed

A request passes, in order: the connection rules (http_protocol.py: header timeout, connection
bound, uvicorn's parse errors), the request id, the API key, admission at arrival, the body
checks (middleware.py, admission.py), then FastAPI's routes; `ServerLimits` (limits.py) holds
every bound, one `kvserve serve` flag each.

Every reply that is not a success has OpenAI's shape `{"error": {"message", "type", "param",
"code"}}` (errors.py lists the statuses), a 500 included (its message names the request id,
its traceback goes to the log). Every reply carries X-Request-Id: the client's, or a new one.
Streaming is server-sent events, one chunk per engine step that produced text, then
`data: [DONE]`. A client that disconnects mid-stream aborts its request.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp

from kvserve.server.admission import AdmissionGate, AdmitAtArrival
from kvserve.server.engine_client import EngineClient
from kvserve.server.errors import add_error_handlers
from kvserve.server.inspector.routes import add_inspector_routes
from kvserve.server.limits import ServerLimits
from kvserve.server.metrics import ServerMetrics
from kvserve.server.middleware import Auth, BodyGuard, RequestContext
from kvserve.server.protocol import ChatCompletionRequest, CompletionRequest
from kvserve.server.serving import Serving, check_model

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def build_app(
    engine: EngineClient,
    model_name: str,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    public_metrics: bool = False,
) -> ASGIApp:
    """The app: FastAPI's routes inside kvserve's ASGI layers (see the module docstring).

    Args:
        api_key: when set, every path but /health (and /metrics with `public_metrics`) needs
            `Authorization: Bearer KEY`.
        limits: the bounds on a request's cost (default: `ServerLimits()`).
    """
    limits = limits or ServerLimits()
    metrics = ServerMetrics(engine.get_metrics, model_name, engine.collectors())
    inspector = getattr(engine, "inspector", None)
    if inspector is not None:  # its TTFT / ITL percentiles
        metrics.latency_windows = (inspector.series.ttft, inspector.series.itl)
    app = _routes(Serving(engine, model_name, metrics, limits=limits))
    # every POST route's body is read and checked by BodyGuard
    routes = [route for route in app.routes if isinstance(route, APIRoute)]
    json_paths = frozenset(route.path for route in routes if "POST" in (route.methods or ()))
    gate = AdmissionGate(engine.max_num_seqs, limits.max_queue_len)
    open_paths = frozenset({"/health", "/metrics"} if public_metrics else {"/health"})
    stack: ASGIApp = BodyGuard(app, limits.max_request_body_bytes, json_paths)
    stack = AdmitAtArrival(stack, gate, GENERATION_PATHS)
    stack = Auth(stack, api_key, open_paths)
    return RequestContext(stack)


def _routes(serving: Serving) -> FastAPI:
    """FastAPI's app: the routes, and errors in OpenAI's shape."""
    app = FastAPI(title="kvserve", docs_url=None, redoc_url=None)
    add_error_handlers(app)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Any:
        body = serving.engine.health()
        return JSONResponse(body, status_code=503 if body["status"] == "down" else 200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [serving.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id, serving.model_name)
        return serving.model_card()

    add_inspector_routes(app, serving.engine)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await serving.chat(body, request)

    return app
