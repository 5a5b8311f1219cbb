"""The server's transport under hostile or careless clients: the API key on every path, request
ids, body and header limits, uvicorn's own errors in OpenAI's shape, the header timeout.

One real `kvserve serve` with `--api-key` and `--header-timeout 1`, on loopback.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from kvserve.bench.server_process import ServerProcess
from tests.server_helpers import (
    assert_openai_error,
    parse_raw_reply,
    port_of,
    raw_exchange,
    wait_until_idle,
)

KEY = "sesame"
AUTH = {"authorization": f"Bearer {KEY}"}
COMPLETION = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def keyed(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    args = ["--model", str(tiny_llama), "--served-model-name", "tiny", "--max-model-len", "128",
            "--num-kv-blocks", "64", "--api-key", KEY, "--header-timeout", "1"]  # fmt: skip
    server = ServerProcess(args, log)
    server.start()
    # /health answers without the key: ServerProcess's wait for it proves that already
    yield server
    assert server.stop() == 0


# (method, path, JSON body, status with the right key): every route, plus unknown ones
ROUTES = [
    ("GET", "/metrics", None, 200),
    ("GET", "/v1/models", None, 200),
    ("GET", "/openapi.json", None, 200),
    ("POST", "/v1/completions", COMPLETION, 200),
    ("POST", "/v1/chat/completions", CHAT, 400),  # past the key: the model has no tokenizer
    ("GET", "/nope", None, 404),
    ("POST", "/v1/nope", COMPLETION, 404),
    ("DELETE", "/v1/completions", None, 405),
    ("GET", "/v1/chat/completions", None, 405),
]
WRONG = [{}, {"authorization": "Bearer wrong"}, {"authorization": KEY},
         {"authorization": f"Basic {KEY}"}, {"authorization": f"Bearer {KEY}x"},
         {"authorization": "Bearer"}, {"x-api-key": KEY}]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body", "status"), ROUTES)
def test_auth_matrix(
    keyed: ServerProcess, method: str, path: str, body: dict[str, object] | None, status: int
) -> None:
    url = keyed.base_url + path
    for headers in WRONG:
        reply = httpx.request(method, url, json=body, headers=headers, timeout=30)
        error = assert_openai_error(reply, 401)
        assert error["type"] == "authentication_error"
        assert reply.headers["www-authenticate"] == "Bearer"
    reply = httpx.request(method, url, json=body, headers=AUTH, timeout=30)
    assert reply.status_code == status, reply.text
    if status != 200:
        assert_openai_error(reply, status)
    lower = httpx.request(method, url, json=body, headers={"authorization": f"bearer {KEY}"})
    assert lower.status_code == status  # the scheme is case-insensitive (RFC 7235)


def test_health_is_open_and_answers_head(keyed: ServerProcess) -> None:
    for method in ("GET", "HEAD"):
        reply = httpx.request(method, f"{keyed.base_url}/health", headers={"authorization": "x"})
        assert reply.status_code == 200
    assert httpx.get(f"{keyed.base_url}/health").json() == {"status": "ok"}
    assert httpx.head(f"{keyed.base_url}/health").content == b""


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"prompt": "a\\ud800"}', b"{" * 10_000],
)
def test_a_bad_body_without_the_key_is_401_not_400(keyed: ServerProcess, content: bytes) -> None:
    url = f"{keyed.base_url}/v1/completions"
    reply = httpx.post(url, content=content, headers={"content-type": "application/json"})
    assert_openai_error(reply, 401)
    assert_openai_error(httpx.post(url, content=content, headers=AUTH), 400)


def test_the_key_is_checked_before_the_body_is_read(keyed: ServerProcess) -> None:
    """A client announcing 30 MB without the key gets its 401 with none of the body sent."""
    head = (
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 30000000\r\nconnection: close\r\n\r\n"
    )
    raw, closed = raw_exchange(port_of(keyed.base_url), head)
    status, _, body = parse_raw_reply(raw)
    assert status == 401 and b"authentication_error" in body


def test_the_openai_client_with_a_wrong_key(keyed: ServerProcess) -> None:
    wrong = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=f"{keyed.base_url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in right.models.list().data] == ["tiny"]


def test_request_ids_are_echoed_generated_and_logged(keyed: ServerProcess) -> None:
    url = f"{keyed.base_url}/v1/completions"
    mine = httpx.post(url, json=COMPLETION, headers={**AUTH, "x-request-id": "trace-42.a"})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "trace-42.a"
    first = httpx.post(url, json=COMPLETION, headers=AUTH)
    second = httpx.post(url, json=COMPLETION, headers=AUTH)
    generated = {first.headers["x-request-id"], second.headers["x-request-id"]}
    assert len(generated) == 2 and all(re.fullmatch("[0-9a-f]{32}", g) for g in generated)
    # response ids: cmpl- + a random uuid4 hex, never a counter that restarts with the process
    ids = {first.json()["id"], second.json()["id"]}
    assert len(ids) == 2 and all(re.fullmatch("cmpl-[0-9a-f]{32}", i) for i in ids)
    # an error carries one too, and a header value that is not a short token is replaced
    bad = httpx.get(f"{keyed.base_url}/nope", headers={**AUTH, "x-request-id": "a" * 500})
    assert re.fullmatch("[0-9a-f]{32}", bad.headers["x-request-id"])
    unauthorized = httpx.get(f"{keyed.base_url}/v1/models", headers={"x-request-id": "r-401"})
    assert unauthorized.headers["x-request-id"] == "r-401"
    log = keyed.log.read_text()
    assert "request trace-42.a: POST /v1/completions -> 200" in log
    assert "request r-401: GET /v1/models -> 401" in log


def test_a_30_mb_body_is_413_and_costs_no_memory(keyed: ServerProcess) -> None:
    assert keyed.process is not None
    status_file = Path(f"/proc/{keyed.process.pid}/status")
    if not status_file.exists():
        pytest.skip("no /proc")

    def rss_kib() -> int:
        line = next(x for x in status_file.read_text().splitlines() if x.startswith("VmRSS"))
        return int(line.split()[1])

    url = f"{keyed.base_url}/v1/completions"
    httpx.post(url, json=COMPLETION, headers=AUTH)  # warm: the first request allocates
    before = rss_kib()
    huge = b'{"prompt": "' + b"a" * 30_000_000 + b'"}'
    for _ in range(3):
        announced = httpx.post(url, content=huge, headers=AUTH, timeout=120)
        assert "30000014 bytes" in assert_openai_error(announced, 413)["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it is read
            for start in range(0, len(huge), 1 << 20):
                yield huge[start : start + (1 << 20)]

        streamed = httpx.post(url, content=chunks(), headers=AUTH, timeout=120)
        assert "larger than the limit" in assert_openai_error(streamed, 413)["message"]
    after = rss_kib()
    assert after <= before * 1.05, (before, after)
    assert httpx.post(url, json=COMPLETION, headers=AUTH).status_code == 200


def test_a_half_sent_header_is_closed_after_the_header_timeout(keyed: ServerProcess) -> None:
    port = port_of(keyed.base_url)
    raw, closed = raw_exchange(port, b"GET /health HTTP/1.1\r\nhost: x\r\nx-half: ")
    assert closed
    status, headers, body = parse_raw_reply(raw)
    assert status == 408 and headers["connection"] == "close"
    assert b"headers: not received within 1 s" in body
    # a connection that sends nothing is closed too, without a reply
    assert raw_exchange(port, b"") == (b"", True)
    # and so is a kept-alive one whose next request stops half way
    whole = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
    raw, closed = raw_exchange(port, whole + b"GET /health HTTP/1.1\r\nho")
    assert closed and raw.count(b"HTTP/1.1 ") == 2
    assert raw.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in raw


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"BLAH\r\n\r\n", 400, b"invalid HTTP request"),
        (b"GET / HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n", 400, b"invalid HTTP request"),
        (b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 40_000 + b"\r\n\r\n", 431,
         b"headers:"),
        (b"GET /health HTTP/1.1\r\nhost: x\r\n" + b"x-many: a\r\n" * 3000 + b"\r\n", 431,
         b"headers:"),
    ],
)  # fmt: skip
def test_uvicorns_own_errors_are_openai_shaped(
    keyed: ServerProcess, data: bytes, status: int, message: bytes
) -> None:
    raw, closed = raw_exchange(port_of(keyed.base_url), data)
    got, headers, body = parse_raw_reply(raw)
    assert closed and got == status and headers["content-type"] == "application/json"
    assert body.startswith(b'{"error": {"message": "' + message)


def test_usage_back_to_zero(keyed: ServerProcess) -> None:
    wait_until_idle(keyed.base_url, AUTH)
