"""uvicorn's h11 protocol with kvserve's connection rules; passed as `http=` to uvicorn.Config.

    no complete request head within header_timeout s  -> 408 (if part of one came), closed
        (armed when the connection opens and after every response: a client that sends
        half a header, or nothing, no longer holds a connection forever)
    a request line or headers h11 refuses               -> 400, closed
    a request head over MAX_HEAD_BYTES                  -> 431, closed (h11 refuses one that
        arrives in pieces; one that arrives whole is measured here)
    more than max_connections open                      -> 503 + Retry-After, closed

Every reply is OpenAI's error JSON; uvicorn's own are plain text.
"""

from __future__ import annotations

import asyncio
import http
import sys
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from kvserve.server.errors import error_bytes, send_error
from kvserve.server.limits import ServerLimits

MAX_HEAD_BYTES = 16 * 1024  # h11's default bound on a request head that has not ended yet


class OpenAIH11Protocol(H11Protocol):
    """One per connection. Subclass with `protocol_class(limits)` to set the limits."""

    header_timeout: float = ServerLimits.header_timeout
    max_connections: int = ServerLimits.max_connections

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._inner_app = self.app
        self.app = self._limit_connections
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request's head must come in time too

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this inside `except h11.RemoteProtocolError`: that error says 400 or
        431 (h11's buffer for one request head, 16 KiB by default, overflowed)."""
        error = sys.exc_info()[1]
        status = 400
        if isinstance(error, h11.RemoteProtocolError):
            status = error.error_status_hint
        if status == 431:
            self._reply_and_close(431, f"headers: more than {MAX_HEAD_BYTES} bytes")
        else:
            self._reply_and_close(status, f"invalid HTTP request: {error or msg}")

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        serving = self.cycle is not None and not self.cycle.response_complete
        if self.transport.is_closing() or serving:
            return  # a request head came in time; its response re-arms the timer
        partial_head = self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]
        if partial_head:
            message = f"headers: not received within {self.header_timeout:g} s"
            self._reply_and_close(408, message)
        else:
            self.transport.close()

    def _reply_and_close(self, status: int, message: str) -> None:
        body = error_bytes(message, "invalid_request_error")
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()

    async def _limit_connections(self, scope: Any, receive: Any, send: Any) -> None:
        """The app uvicorn runs for each request on this connection."""
        head_bytes = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if head_bytes > MAX_HEAD_BYTES:
            message = f"headers: {head_bytes} bytes; the limit is {MAX_HEAD_BYTES}"
            await send_error(send, 431, message, headers={"Connection": "close"})
        elif len(self.connections) > self.max_connections:
            message = f"more than {self.max_connections} open connections; retry later"
            headers = {"Retry-After": "1", "Connection": "close"}
            await send_error(send, 503, message, "overloaded", headers=headers)
        else:
            await self._inner_app(scope, receive, send)


def protocol_class(limits: ServerLimits) -> type[OpenAIH11Protocol]:
    """`OpenAIH11Protocol` with `limits`' header timeout and connection bound."""
    attributes = {
        "header_timeout": limits.header_timeout,
        "max_connections": limits.max_connections,
    }
    return type("KVServeH11Protocol", (OpenAIH11Protocol,), attributes)
