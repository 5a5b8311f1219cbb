"""The ASGI layers every request passes before FastAPI, outermost first:

    RequestContext  X-Request-Id in and out, one log line per request, and any fault a 500 in
                    OpenAI's shape naming the request id (logged with its traceback)
    Auth            with an API key: `Authorization: Bearer KEY` on every path but the open
                    ones, checked before the body is read, in constant time -> 401; the KV
                    inspector's pages (/kv...) also take HTTP Basic (the key as password),
                    so a browser asks for it
    AdmitAtArrival  (admission.py) a seat per generation request -> 429
    BodyGuard       Content-Length or the bytes read past the limit -> 413; a POST body that
                    is not a JSON object in UTF-8 (request_body.py) -> 400; one that is, is
                    handed on as application/json whatever its Content-Type said

They are plain ASGI callables (not Starlette's BaseHTTPMiddleware) so that a reply can be sent
without touching the body, and streams pass through untouched.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvserve.server.errors import send_error
from kvserve.server.request_body import BodyRejected, check_json_object, declared_length, read_body

logger = logging.getLogger("kvserve.server")

MAX_REQUEST_ID_CHARS = 128


class RequestContext:
    """Outermost layer: the request id (the client's X-Request-Id when it is short printable
    ASCII, else a new uuid4 hex) is put in `scope["state"]["request_id"]` and sent back as
    X-Request-Id on every reply."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s failed: %s %s", request_id, scope["method"], scope["path"])
            if status == 0:
                message = f"internal server error (request {request_id})"
                await send_error(send_with_id, 500, message, "internal_server_error")
        logger.info("request %s: %s %s -> %d", request_id, scope["method"], scope["path"], status)


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id":
            if 0 < len(value) <= MAX_REQUEST_ID_CHARS and all(33 <= b <= 126 for b in value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


class Auth:
    """With `api_key`, every path but `open_paths` needs `Authorization: Bearer KEY`; paths
    under `browser_prefix` take `Authorization: Basic` too (any user, the key as password),
    and their 401 asks a browser for it."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        open_paths: frozenset[str],
        browser_prefix: str = "/kv",
    ) -> None:
        self.app = app
        self.key = None if api_key is None else api_key.encode()
        self.open_paths = open_paths
        self.browser_prefix = browser_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and scope["path"] not in self.open_paths
        if guarded and self.key is not None:
            path = scope["path"]
            browser = path == self.browser_prefix or path.startswith(self.browser_prefix + "/")
            if not _authorized(scope["headers"], self.key, browser):
                message = "invalid or missing API key: send 'Authorization: Bearer KEY'"
                challenge = 'Basic realm="kvserve", charset="UTF-8"' if browser else "Bearer"
                headers = {"WWW-Authenticate": challenge}
                await send_error(send, 401, message, "authentication_error", headers=headers)
                return
        await self.app(scope, receive, send)


def _authorized(headers: list[tuple[bytes, bytes]], key: bytes, basic: bool) -> bool:
    """The Bearer token is the key (with `basic`, also: a Basic password is the key)."""
    given = next((value for name, value in headers if name == b"authorization"), b"")
    scheme, _, token = given.partition(b" ")
    scheme = scheme.lower()
    if basic and scheme == b"basic":
        try:
            _, _, token = base64.b64decode(token.strip(), validate=True).partition(b":")
        except binascii.Error:
            return False
        scheme = b"bearer"
    # compare_digest takes time independent of where the bytes differ
    return scheme == b"bearer" and hmac.compare_digest(token.strip(), key)


class BodyGuard:
    """413 for a body past `limit` bytes (announced or read); for POSTs to `json_paths`, the
    body is read here, checked to be a JSON object, and handed on in one piece."""

    def __init__(self, app: ASGIApp, limit: int, json_paths: frozenset[str]) -> None:
        self.app, self.limit, self.json_paths = app, limit, json_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope["headers"])
        try:
            if declared is not None and declared > self.limit:
                raise BodyRejected(413, f"body: {declared} bytes; the limit is {self.limit}")
            if scope["method"] != "POST" or scope["path"] not in self.json_paths:
                await self.app(scope, receive, send)  # these routes never read a body
                return
            body = await read_body(receive, self.limit)
            if body is None:
                return  # the client hung up
            check_json_object(body)
        except BodyRejected as error:
            await send_error(send, error.status, str(error), param=error.param)
            return
        # it is JSON whatever it was labelled (`curl -d` says form data): FastAPI must parse it
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read already, then the client's (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
