"""Errors of the HTTP API, all in OpenAI's shape `{"error": {message, type, param, code}}`.

400 invalid_request_error   bad input (ValueError naming the field, body validation, a body
                            that is not a JSON object in UTF-8)
401 authentication_error    missing or wrong API key
404 invalid_request_error   unknown model or path
405 invalid_request_error   wrong method (with Allow)
408 invalid_request_error   headers not sent within --header-timeout
413 invalid_request_error   body larger than --max-request-body-bytes
429 overloaded              too many requests waiting (with Retry-After)
431 invalid_request_error   headers too large
500 internal_server_error   the engine failed, or a bug (the message names the request id)
503 overloaded              more than --max-connections open connections

`send_error` answers from plain ASGI (the middleware, before FastAPI); `add_error_handlers`
turns what a route raises into the same shape.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Send

from kvserve.server.async_engine import EngineDeadError
from kvserve.server.protocol import describe_validation_error
from kvserve.server.slo_gate import SLOMiss


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


def error_body(
    message: str, kind: str, param: str | None = None, code: Any = None
) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int, message: str, kind: str, param: str | None = None, code: Any = None
) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def error_bytes(message: str, kind: str, param: str | None = None, code: Any = None) -> bytes:
    """`error_body` as UTF-8 JSON."""
    return json.dumps(error_body(message, kind, param, code)).encode()


async def send_error(
    send: Send,
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """Answer an ASGI request with an OpenAI-shaped error (nothing sent before)."""
    body = error_bytes(message, kind, param)
    raw_headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def add_error_handlers(app: FastAPI) -> None:
    """Turn every exception a route raises into an OpenAI-shaped JSON reply."""

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(list(error.errors()))
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(ValueError)
    async def bad_value(_: Request, error: ValueError) -> JSONResponse:
        message = str(error)
        param = message.split(":", 1)[0] if ":" in message else None
        if param is not None and " " in param:
            param = None
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(Rejected)
    async def rejected(_: Request, error: Rejected) -> JSONResponse:
        reply = error_response(error.status, str(error), error.kind)
        reply.headers.update(error.headers)
        return reply

    @app.exception_handler(SLOMiss)
    async def slo_miss(_: Request, error: SLOMiss) -> JSONResponse:
        reply = error_response(429, str(error), "overloaded")
        reply.headers["Retry-After"] = "1"
        return reply

    @app.exception_handler(ModelNotFound)
    async def unknown_model(_: Request, error: ModelNotFound) -> JSONResponse:
        return error_response(404, str(error), "invalid_request_error", "model", "model_not_found")

    @app.exception_handler(EngineDeadError)
    async def engine_failed(request: Request, error: EngineDeadError) -> JSONResponse:
        message = f"the engine failed: {error} (request {_request_id(request)})"
        return error_response(500, message, "internal_server_error")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        """Starlette's own: 404 unknown path, 405 wrong method (with Allow)."""
        message = f"{error.detail}: {request.method} {request.url.path}"
        reply = error_response(error.status_code, message, "invalid_request_error")
        reply.headers.update(error.headers or {})
        return reply

    @app.exception_handler(Exception)
    async def bug(request: Request, _: Exception) -> JSONResponse:
        """A fault of the server (logged with its traceback by the request middleware)."""
        message = f"internal server error (request {_request_id(request)})"
        return error_response(500, message, "internal_server_error")


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "unknown"))
