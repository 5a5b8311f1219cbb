"""A fuzz of the HTTP API against a real `kvserve serve` (a tiny model with a tokenizer and a
chat template): every route and method, broken bodies and encodings, every request field with
wrong types and out-of-range values. Asserted for each: no 5xx, OpenAI's error shape on every
4xx, a 400 naming the field where the value is wrong; at the end, the server still serves and
holds no KV block.

`n` and `best_of` of 10**12 are among the cases: before `--max-n` was enforced such a request
forked that many children and the server was OOM-killed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvserve.bench.server_process import ServerProcess
from tests.server_helpers import assert_openai_error, metric, wait_until_idle

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
BASE: dict[str, dict[str, Any]] = {
    COMPLETIONS: {"model": "tiny", "prompt": "hello", "max_tokens": 2},
    CHAT: {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
}


@pytest.fixture(scope="module")
def server(tiny_chat_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    args = ["--model", str(tiny_chat_llama), "--served-model-name", "tiny",
            "--max-model-len", "128", "--num-kv-blocks", "64"]  # fmt: skip
    with ServerProcess(args, log) as process:
        yield process.base_url


def check_reply(reply: httpx.Response) -> None:
    """No 5xx; every 4xx in OpenAI's shape (a HEAD reply has no body to check)."""
    assert reply.status_code < 500, reply.text
    if reply.status_code >= 400 and reply.request.method != "HEAD":
        assert_openai_error(reply)


# ---- every route and method -------------------------------------------------------------

PATHS = ["/health", "/metrics", "/v1/models", COMPLETIONS, CHAT, "/openapi.json", "/docs",
         "/nope", "/v1", "/v1/models/tiny", "/v1/completions/", "//v1//models", "/%ff"]  # fmt: skip
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
KNOWN = {"/health": {"GET", "HEAD"}, "/metrics": {"GET"}, "/v1/models": {"GET"},
         COMPLETIONS: {"POST"}, CHAT: {"POST"}, "/openapi.json": {"GET", "HEAD"}}  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path", PATHS)
def test_every_route_and_method(server: str, path: str, method: str) -> None:
    reply = httpx.request(method, server + path, timeout=30)
    check_reply(reply)
    if path not in KNOWN and path != "/v1/models/tiny":  # the lead adds models/{id}
        assert reply.status_code in (404, 307), reply.text  # 307: Starlette's trailing slash
    elif path in KNOWN and method not in KNOWN[path]:
        assert reply.status_code == 405 and reply.headers["allow"]
    elif path in KNOWN and method in ("GET", "HEAD"):
        assert reply.status_code == 200
    elif path in KNOWN:  # POST without a body
        assert reply.status_code == 400


# ---- broken bodies and encodings ---------------------------------------------------------

DEEP = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
BROKEN: list[tuple[bytes, str | None]] = [  # (body, the param the 400 names)
    (b"", None), (b"{", None), (b'{"prompt": [1, 2', None), (b'{"prompt": "abc', None),
    (b"[]", None), (b'[{"prompt": "x"}]', None), (b'"prompt"', None), (b"0", None),
    (b"null", None), (b"true", None), (b"\xff\xfe\x00", None), (b'{"prompt": "\xc3\x28"}', None),
    (b'{"prompt": "\xed\xa0\x80"}', None),  # a surrogate encoded in UTF-8: not UTF-8
    (b'\xef\xbb\xbf{"prompt": "x"}', None), (b"[" * 100_000, None), (DEEP, None),
    (b'{"prompt": "x", "n": 1' + b"0" * 5000 + b"}", None),
    (b'{"prompt": "a\\ud800b", "messages": []}', "prompt"),
    (b'{"prompt": ["ok", "\\udc00"]}', "prompt[1]"),
    (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content"),
    (b'{"messages": [{"role": "\\udbff", "content": "x"}]}', "messages[0].role"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages[0].content[0].text"),
    (b'{"prompt": "x", "messages": [{"role": "user", "content": "x"}], "stop": ["\\ud800"]}',
     "stop[0]"),
    (b'{"model": "\\ud800"}', "model"), (b'{"\\ud800": 1}', "body"),
]  # fmt: skip


@pytest.mark.parametrize("route", [COMPLETIONS, CHAT])
@pytest.mark.parametrize(("body", "param"), BROKEN, ids=[repr(b[:40]) for b, _ in BROKEN])
def test_broken_bodies(server: str, route: str, body: bytes, param: str | None) -> None:
    reply = httpx.post(server + route, content=body, timeout=30,
                       headers={"content-type": "application/json"})  # fmt: skip
    error = assert_openai_error(reply, 400)
    if param is not None:
        assert error["param"] == param and "lone UTF-16 surrogate" in error["message"]


# ---- every field: wrong types and out-of-range values ------------------------------------

COMMON = {"model": "str", "max_tokens": "count", "temperature": "float", "top_p": "float",
          "n": "n", "stop": "stop", "seed": "seed", "presence_penalty": "penalty",
          "frequency_penalty": "penalty", "stream": "bool", "stream_options": "object",
          "user": "str", "top_k": "top_k", "min_p": "float", "repetition_penalty": "float",
          "min_tokens": "count", "ignore_eos": "bool", "stop_token_ids": "ids",
          "logit_bias": "object", "response_format": "object"}  # fmt: skip
FIELDS = {
    COMPLETIONS: {**COMMON, "prompt": "prompt", "logprobs": "logprobs", "echo": "bool",
                  "best_of": "n", "suffix": "str"},
    CHAT: {**COMMON, "messages": "messages", "max_completion_tokens": "count",
           "logprobs": "bool", "top_logprobs": "logprobs", "tools": "list"},
}  # fmt: skip
HUGE = "1" + "0" * 30
NON_FINITE = ["NaN", "Infinity", "-Infinity"]
# kind -> (values that must be a 400, values that may pass); JSON text, spliced in raw
VALUES: dict[str, tuple[list[str], list[str]]] = {
    "count": (['"1"', "true", "1.5", "[]", "{}", "-1", HUGE], ["null", "0"]),
    "n": (['"1"', "true", "1.5", "[]", "{}", "-1", "0", "1000000000000"], ["null"]),
    "logprobs": (['"1"', "true", "1.5", "[]", "{}", "-1", HUGE], ["null", "0"]),
    "seed": (['"1"', "true", "1.5", "[]", "{}"], ["null", "-1", "0", HUGE]),
    "top_k": (['"1"', "true", "1.5", "[]", "{}"], ["null", "-1", "0", HUGE]),
    "float": (['"0.5"', "true", "[]", "{}", "-1", "-1e300", *NON_FINITE], ["null", "0", "1e300"]),
    "penalty": (['"0.5"', "true", "[]", "{}", "-1e300", "1e300", *NON_FINITE], ["null", "-1"]),
    "bool": (['"true"', "1", "[]", "{}"], ["null"]),
    "str": (["1", "true", "[]", "{}"], ["null", '""']),
    "object": (['"x"', "1", "true", "[]"], ["null"]),
    "list": (['"x"', "1", "true", "{}"], ["null"]),
    "stop": (["1", "true", "{}", "[1]", "[[]]", "[null]"], ["null", '""', "[]"]),
    "ids": (['"1"', "[true]", '["1"]', "{}", "[1.5]", "[-1]"], ["null", "[]", f"[{HUGE}]"]),
    "prompt": (["1", "true", "{}", "null", "[]", "[true]", "[1.5]", "[[true]]", "[{}]", "[-1]",
                f"[{HUGE}]", "[[]]"], ['""', '["a", "b"]', "[[1], [2]]"]),
    "messages": (['"hi"', "{}", "null", "[]", "[1]", '[{"role": 1, "content": "x"}]',
                  '[{"role": "user", "content": 1}]', '[{"role": "robot", "content": "x"}]',
                  '[{"role": "user", "content": [{"type": "image_url"}]}]',
                  '[{"role": "user", "content": [{"type": "text", "text": 1}]}]',
                  '[{"content": "x"}]'], ['[{"role": "user", "content": null}]']),
}  # fmt: skip


def field_cases() -> Iterator[Any]:
    for route, fields in FIELDS.items():
        for field, kind in fields.items():
            must_fail, may_pass = VALUES[kind]
            for value in must_fail + may_pass:
                case_id = f"{'chat' if route == CHAT else 'cmpl'}-{field}={value[:64]}"
                yield pytest.param(route, field, value, value in must_fail, id=case_id)


@pytest.mark.parametrize(("route", "field", "value", "must_fail"), list(field_cases()))
def test_field(server: str, route: str, field: str, value: str, must_fail: bool) -> None:
    body = {k: v for k, v in BASE[route].items() if k != field}
    raw = json.dumps(body)[:-1] + f', "{field}": {value}}}'
    reply = httpx.post(server + route, content=raw.encode(), timeout=60,
                       headers={"content-type": "application/json"})  # fmt: skip
    check_reply(reply)
    if must_fail:
        assert reply.status_code == 400, reply.text
    if reply.status_code == 400:  # the message says what was wrong: the field, or the literal
        message = reply.json()["error"]["message"]
        assert field in message or value in message, message


# ---- afterwards --------------------------------------------------------------------------


def test_the_server_still_serves_and_holds_no_kv_block(server: str) -> None:
    wait_until_idle(server)
    assert metric(server, "kv_cache_usage_perc") == 0.0
    reply = httpx.post(server + CHAT, json=BASE[CHAT], timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
