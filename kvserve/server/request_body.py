"""A request body, read under a size limit and checked to be a JSON object before any route
parses it.

    Content-Length > limit            -> 413, nothing read
    chunks add up past the limit      -> 413, reading stops there
    bytes not UTF-8                   -> 400 naming the byte offset
    not JSON, NaN/Infinity, 1e999     -> 400 (RFC 8259 has no non-finite numbers)
    not an object                     -> 400
    nested deeper than MAX_DEPTH      -> 400
    a lone UTF-16 surrogate escape    -> 400 naming where it is ("messages.0.content")

Python's json module accepts `"\\ud800"` and makes a str no encoder (the tokenizer included)
can handle; rejecting it here is the one place every route gets it from.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from starlette.types import Receive

MAX_DEPTH = 64
# a \\u escape of a surrogate code point (D800-DFFF); only these can make a lone surrogate, as
# strict UTF-8 decoding already refuses encoded surrogates
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class BodyRejected(Exception):
    """The body cannot be served: `status` 400 or 413, `param` the JSON path when known."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length header as an int (h11 has already checked its syntax)."""
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None if the client hung up.

    Raises:
        BodyRejected: 413 once more than `limit` bytes arrived (the rest is not read).
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyRejected(413, f"body: larger than the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def check_json_object(body: bytes) -> None:
    """Raises BodyRejected (400) unless `body` is a JSON object any route can parse."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BodyRejected(400, f"body: invalid UTF-8 at byte {error.start}") from None
    non_finite: list[str] = []  # NaN, Infinity or 1e999 as written: found by the walk below
    try:
        value = json.loads(
            text,
            parse_constant=lambda name: _non_finite(name, non_finite),
            parse_float=lambda number: _float(number, non_finite),
        )
    except json.JSONDecodeError as error:
        raise BodyRejected(400, f"body: invalid JSON: {error}") from None
    except RecursionError:
        raise BodyRejected(400, f"body: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise BodyRejected(400, f"body: {error}") from None
    if not isinstance(value, dict):
        raise BodyRejected(400, f"body: must be a JSON object, got {_json_kind(value)}")
    nested = text.count("[") + text.count("{") > MAX_DEPTH
    if nested or non_finite or _SURROGATE_ESCAPE.search(text):
        _check_values_and_depth(value)


def _non_finite(name: str, seen: list[str]) -> float:
    seen.append(name)
    return float(name)


def _float(text: str, seen: list[str]) -> float:
    number = float(text)
    if not math.isfinite(number):
        seen.append(text)
    return number


def _check_values_and_depth(root: dict[str, Any]) -> None:
    """Walk the parsed body (without recursion): every str encodes, every float is finite
    (RFC 8259 has no NaN or Infinity), no container is nested deeper than MAX_DEPTH."""
    stack: list[tuple[Any, str, int]] = [(root, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_string(value, path)
        elif isinstance(value, float) and not math.isfinite(value):
            message = f"{path}: numbers must be finite (JSON has no NaN or Infinity)"
            raise BodyRejected(400, message, path)
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise BodyRejected(400, f"{path}: nested deeper than {MAX_DEPTH} levels", path)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_string(key, path or "body", " of a key")
                child = (
                    f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
                )
                stack.append((item, child, depth + 1))


def _check_string(text: str, path: str, where: str = "") -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        message = f"{path}: lone UTF-16 surrogate at character {error.start}{where}"
        raise BodyRejected(400, message, path) from None


def _json_kind(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
