"""The server's transport pieces without a server: limits, the admission gate, the body
checks, the request context's 500."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from kvserve.cli import build_parser
from kvserve.server.admission import AdmissionGate
from kvserve.server.errors import Rejected, add_error_handlers
from kvserve.server.limits import ServerLimits, limits_from_args
from kvserve.server.middleware import RequestContext
from kvserve.server.request_body import MAX_DEPTH, BodyRejected, check_json_object


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_request_body_bytes": 0}, "max_request_body_bytes"),
        ({"max_request_body_bytes": True}, "max_request_body_bytes"),
        ({"header_timeout": 0}, "header_timeout"),
        ({"header_timeout": float("inf")}, "header_timeout"),
        ({"header_timeout": "1"}, "header_timeout"),
        ({"max_connections": -1}, "max_connections"),
        ({"max_queue_len": -1}, "max_queue_len"),
        ({"max_prompt_chars": 0}, "max_prompt_chars"),
        ({"max_n": 0}, "max_n"),
        ({"max_n": 2.0}, "max_n"),
        ({"max_batch_prompts": 0}, "max_batch_prompts"),
    ],
)
def test_server_limits_name_the_bad_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        ServerLimits(**kwargs)  # type: ignore[arg-type]


def test_server_limits_come_from_serve_flags() -> None:
    parser = build_parser()
    assert limits_from_args(parser.parse_args(["serve"])) == ServerLimits()
    args = parser.parse_args(["serve", "--max-queue-len", "0", "--header-timeout", "2.5",
                              "--max-request-body-bytes", "100", "--max-n", "4"])  # fmt: skip
    limits = limits_from_args(args)
    assert (limits.max_queue_len, limits.header_timeout) == (0, 2.5)
    assert (limits.max_request_body_bytes, limits.max_n, limits.max_batch_prompts) == (100, 4, 64)
    assert ServerLimits().max_queue_len is None and ServerLimits().max_prompt_chars is None


def test_the_gate_holds_max_num_seqs_plus_max_queue_len_seats() -> None:
    gate = AdmissionGate(max_num_seqs=2, max_queue_len=1)
    seats = [gate.reserve() for _ in range(3)]
    assert (gate.num_taken, gate.num_waiting) == (3, 1)
    with pytest.raises(Rejected) as caught:
        gate.reserve()
    assert caught.value.status == 429 and caught.value.headers == {"Retry-After": "1"}
    gate.release(seats[0])
    gate.release(seats[0])  # twice: no effect
    assert gate.num_taken == 2
    seats[1].grow(2)  # n=2: one more seat, the last one
    assert gate.num_taken == 3
    with pytest.raises(Rejected):
        seats[2].grow(2)  # no seat left: 429, and the request keeps the one it has
    assert (gate.num_taken, seats[2].num_seats) == (3, 1)
    with pytest.raises(ValueError, match="^n: this request needs 4 sequences"):
        seats[2].grow(4)  # more than all the seats: never fits, a 400
    with pytest.raises(ValueError, match="^prompt: "):
        seats[2].grow(4, param="prompt")
    for seat in seats[1:]:
        gate.release(seat)
    assert gate.num_taken == 0


def test_without_a_queue_limit_the_gate_only_counts() -> None:
    gate = AdmissionGate(max_num_seqs=1, max_queue_len=None)
    seats = [gate.reserve() for _ in range(50)]
    seats[0].grow(100)
    assert gate.num_taken == 149 and gate.num_waiting == 148


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        (b"", "body: invalid JSON", None),
        (b'{"prompt": [1,', "body: invalid JSON", None),
        (b"\xff{}", "body: invalid UTF-8 at byte 0", None),
        (b'{"prompt": "\xc3\x28"}', "body: invalid UTF-8 at byte 12", None),
        (b"[1]", "body: must be a JSON object, got an array", None),
        (b"null", "body: must be a JSON object, got null", None),
        (b'"x"', "body: must be a JSON object, got a string", None),
        (b"12", "body: must be a JSON object, got a number", None),
        (b'{"temperature": NaN}', "temperature: numbers must be finite", "temperature"),
        (b'{"stop": [1, -Infinity]}', "stop[1]: numbers must be finite", "stop[1]"),
        (b'{"a": {"b": 1e999}}', "a.b: numbers must be finite", "a.b"),
        (b'{"n": 1' + b"0" * 5000 + b"}", "body: Exceeds the limit", None),
        (b'{"prompt": "a\\ud800b"}', "prompt: lone UTF-16 surrogate at character 1", "prompt"),
        (b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
         "messages[0].content: lone UTF-16 surrogate", "messages[0].content"),
        (b'{"stop": ["ok", "x\\uDC00"]}', "stop[1]: lone UTF-16 surrogate", "stop[1]"),
        (b'{"a": {"\\ud800": 1}}', "a: lone UTF-16 surrogate at character 0 of a key", "a"),
        (b'{"\\ud800": 1}', "body: lone UTF-16 surrogate at character 0 of a key", "body"),
        (b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}", "a", None),
        (b'{"a": ' + b"[" * 100_000 + b"}", "body: ", None),
    ],
)  # fmt: skip
def test_bodies_that_no_route_could_parse(body: bytes, message: str, param: str | None) -> None:
    with pytest.raises(BodyRejected) as caught:
        check_json_object(body)
    assert caught.value.status == 400
    assert str(caught.value).startswith(message), str(caught.value)
    if param is not None:
        assert caught.value.param == param


def test_bodies_that_pass() -> None:
    check_json_object(b'{"prompt": "\\ud83d\\ude00 and \\\\ud800 as text", "n": 1.5e3}')
    nested = b'{"a": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    check_json_object(nested)
    check_json_object(b'{"prompt": [' + b"1, " * 100_000 + b"1]}")


def _app_with_a_bug() -> FastAPI:
    app = FastAPI()
    add_error_handlers(app)

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("a bug")

    return app


def test_a_fault_in_a_route_is_an_openai_500_naming_the_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = TestClient(RequestContext(_app_with_a_bug()), raise_server_exceptions=False)
    with caplog.at_level(logging.INFO, logger="kvserve.server"):
        reply = client.get("/bug", headers={"x-request-id": "req-7"})
    assert reply.status_code == 500 and reply.headers["x-request-id"] == "req-7"
    error = reply.json()["error"]
    assert error["type"] == "internal_server_error" and "req-7" in error["message"]
    failed = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failed) == 1 and "request req-7 failed" in failed[0].getMessage()
    assert failed[0].exc_info is not None  # the traceback is logged
    assert "request req-7: GET /bug -> 500" in caplog.text


def test_a_fault_before_any_route_is_an_openai_500_too() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise KeyError("middleware bug")

    reply = TestClient(RequestContext(broken), raise_server_exceptions=False).get("/")
    assert reply.status_code == 500
    request_id = reply.headers["x-request-id"]
    assert reply.json()["error"]["message"] == f"internal server error (request {request_id})"
