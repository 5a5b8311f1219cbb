"""Errors of the HTTP API, all in OpenAI's shape `{"error": {message, type, param, code}}`.

400 invalid_request_error   bad input (ValueError naming the field, body validation)
401 authentication_error    missing or wrong API key
404 invalid_request_error   unknown model
429 overloaded              too many requests waiting (with Retry-After)
500 internal_server_error   the engine failed
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from kvserve.server.async_engine import EngineDeadError
from kvserve.server.protocol import describe_validation_error


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

    @app.exception_handler(ModelNotFound)
    async def unknown_model(_: Request, error: ModelNotFound) -> JSONResponse:
        return error_response(404, str(error), "invalid_request_error", "model", "model_not_found")

    @app.exception_handler(EngineDeadError)
    async def engine_failed(_: Request, error: EngineDeadError) -> JSONResponse:
        return error_response(500, f"the engine failed: {error}", "internal_server_error")
