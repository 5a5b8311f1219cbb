"""Helpers for tests against a real `kvserve serve` process: OpenAI's error shape, /metrics,
raw HTTP over a socket (for what httpx will not send); and a server in a thread of the test
whose engine steps only when the test lets it (`StepGate`), for what must not depend on how
fast the machine is."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from kvserve.engine.engine import Engine
from kvserve.outputs import RequestOutput
from kvserve.server.api_server import build_app
from kvserve.server.async_engine import AsyncEngine
from kvserve.server.launch import uvicorn_config
from kvserve.server.limits import ServerLimits


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


def wait_for(condition: Callable[[], bool], what: str, bound_s: float = 60) -> None:
    """Poll `condition` until it holds; fail naming `what` after `bound_s` (generous: a
    bound for a hung server, never a measure of speed)."""
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {bound_s:g} s: {what}"
        time.sleep(0.02)


class StepGate:
    """Holds an engine's steps until the test lets them run, so a request cannot finish (or
    even start) until the test says so, however fast the machine is.

    Wraps `engine.step`: each step waits for a permit (`allow(k)`), or none once `open()`.
    `before_step`, when set, runs on the engine's thread once the permit is given, just
    before the step (e.g. the AsyncEngine's pending commands, so requests that arrived while
    the step was held join it).
    """

    def __init__(self, engine: Engine) -> None:
        self._cond = threading.Condition()
        self._permits: int | None = 0  # None: open
        self.num_steps = 0
        self.before_step: Callable[[], None] | None = None
        step = engine.step

        def gated_step() -> list[RequestOutput]:
            with self._cond:
                self._cond.wait_for(lambda: self._permits is None or self._permits > 0)
                if self._permits is not None:
                    self._permits -= 1
            if self.before_step is not None:
                self.before_step()
            outputs = step()
            with self._cond:
                self.num_steps += 1
            return outputs

        engine.step = gated_step  # type: ignore[method-assign]

    def allow(self, num_steps: int) -> None:
        """Let `num_steps` more steps run."""
        with self._cond:
            assert self._permits is not None, "the gate is open"
            self._permits += num_steps
            self._cond.notify_all()

    def open(self) -> None:
        """Let every step run from now on."""
        with self._cond:
            self._permits = None
            self._cond.notify_all()


def gated_inspected_engine(engine: Engine, show_text: bool) -> tuple[StepGate, AsyncEngine]:
    """`engine` behind a StepGate, in an AsyncEngine whose inspector copies after every step
    (the next copy no sooner than the last one ends) and shows text when `show_text`."""
    gate = StepGate(engine)
    async_engine = AsyncEngine(engine)
    async_engine.inspector.show_text = show_text
    async_engine.inspector.interval_s = 0.0
    async_engine.inspector.copy_budget = 1.0
    gate.before_step = async_engine._apply_commands
    return gate, async_engine


@contextmanager
def serve_in_thread(
    engine: AsyncEngine, api_key: str | None = None, limits: ServerLimits | None = None
) -> Iterator[str]:
    """`build_app` under uvicorn (as `kvserve serve` runs it) on a free loopback port, in a
    thread of the test; yields the base URL. Stops the server, then the engine loop."""
    limits = limits or ServerLimits()
    app = build_app(engine, "tiny", api_key, limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "the server starts")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
        engine.shutdown()


def send_post(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a JSON POST on a new connection and return the socket unread (close it to hang
    up)."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(head.encode() + payload)
    return sock
