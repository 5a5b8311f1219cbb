"""Helpers for tests against a real `kvserve serve` process: OpenAI's error shape, /metrics,
raw HTTP over a socket (for what httpx will not send)."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx


def assert_openai_error(reply: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """A 4xx/5xx whose JSON body is `{"error": {message, type, param, code}}`; the error."""
    if status is not None:
        assert reply.status_code == status, reply.text
    assert reply.status_code >= 400, reply.text
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return dict(error)


def metric(base: str, name: str, headers: dict[str, str] | None = None) -> float:
    """The value of `kvserve:<name>` in /metrics."""
    for line in httpx.get(f"{base}/metrics", headers=headers, timeout=30).text.splitlines():
        if line.startswith(f"kvserve:{name}"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def wait_until_idle(base: str, headers: dict[str, str] | None = None, bound_s: float = 30) -> None:
    """Wait (at most `bound_s`) until no request runs or waits and no KV block is used."""
    deadline = time.monotonic() + bound_s
    names = ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting")
    while time.monotonic() < deadline:
        if all(metric(base, name, headers) == 0 for name in names):
            return
        time.sleep(0.1)
    for name in names:
        assert metric(base, name, headers) == 0, name


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def raw_exchange(port: int, data: bytes, bound_s: float = 30) -> tuple[bytes, bool]:
    """Send `data` on a new connection and read until the server closes it (or `bound_s`
    passes); (what came back, whether the server closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=bound_s) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + bound_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received, False
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
        return received, False


def parse_raw_reply(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers lower-cased, body) of one HTTP/1.1 reply."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body
