"""Every way a request leaves the server frees its KV blocks: a stop string, a failed model
step (plain and streamed); the hang-ups are in test_server.py. Each runs a server in this
process, so the test can break the engine on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from kvserve.outputs import RequestOutput
from kvserve.server.async_engine import AsyncEngine
from tests.helpers import make_engine
from tests.server_helpers import assert_openai_error, metric, serve_in_thread, wait_until_idle

SMALL = {"prompt": [1, 2], "max_tokens": 2}


def test_a_stop_string_ends_the_request_and_frees_its_blocks(tiny_chat_llama: Path) -> None:
    engine = make_engine(str(tiny_chat_llama), num_kv_blocks=64)
    with serve_in_thread(AsyncEngine(engine)) as base:
        url = f"{base}/v1/completions"
        body = {"prompt": "hello there", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        whole = httpx.post(url, json=body, timeout=60).json()["choices"][0]
        stop = whole["text"][4:6]
        assert len(stop) == 2, whole
        stopped = httpx.post(url, json={**body, "stop": [stop]}, timeout=60).json()["choices"][0]
        assert stopped["finish_reason"] == "stop" and stopped["stop_reason"] == stop
        assert whole["text"].startswith(stopped["text"]) and stop not in stopped["text"]
        wait_until_idle(base)


@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_step_fails_its_request_and_frees_its_blocks(
    tiny_llama: Path, stream: bool
) -> None:
    engine = make_engine(str(tiny_llama), num_kv_blocks=64)
    step, num_calls = engine.step, 0

    def step_that_fails_second() -> list[RequestOutput]:
        """The first step prefills (the request then holds blocks); the second fails."""
        nonlocal num_calls
        num_calls += 1
        if num_calls == 2:
            raise RuntimeError("injected fault")
        return step()

    engine.step = step_that_fails_second  # type: ignore[method-assign]
    with serve_in_thread(AsyncEngine(engine)) as base:
        url = f"{base}/v1/completions"
        body = {"prompt": [4] * 20, "max_tokens": 10, "ignore_eos": True, "stream": stream}
        reply = httpx.post(url, json=body, timeout=60)
        if stream:  # the first chunk was sent: the stream ends with an error event
            assert reply.status_code == 200
            frames = [line for line in reply.text.splitlines() if line]
            assert frames[-1] == "data: [DONE]"
            error = json.loads(frames[-2].removeprefix("data: "))["error"]
        else:
            error = assert_openai_error(reply, 500)
        assert error["type"] == "internal_server_error" and "injected fault" in error["message"]
        wait_until_idle(base)
        assert httpx.post(url, json=SMALL, timeout=60).status_code == 200  # still serving
        assert metric(base, "kv_cache_usage_perc") == 0.0
