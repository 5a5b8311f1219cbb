"""A real `kvserve serve` process on a free loopback port, driven by the official openai client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import openai
import pytest

from kvserve.bench.server_process import ServerProcess
from kvserve.server.async_engine import AsyncEngine
from kvserve.server.limits import ServerLimits
from tests.helpers import make_engine
from tests.server_helpers import (
    StepGate,
    metric,
    port_of,
    send_post,
    serve_in_thread,
    wait_for,
    wait_until_idle,
)

TINY_NAME = "tiny"


@pytest.fixture(scope="module")
def tiny_server(
    make_tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    root = tmp_path_factory.mktemp("server")
    model = make_tiny_checkpoint("llama", root)
    args = ["--model", str(model), "--served-model-name", TINY_NAME, "--max-model-len", "128",
            "--num-kv-blocks", "64"]  # fmt: skip
    with ServerProcess(args, root / "server.log") as server:
        yield server.base_url


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def test_models_and_health(tiny_server: str) -> None:
    models = client(tiny_server).models.list()
    assert [m.id for m in models.data] == [TINY_NAME]
    assert httpx.get(f"{tiny_server}/health").json() == {"status": "ok"}


def test_completion_from_token_ids_is_greedy_and_reports_usage(tiny_server: str) -> None:
    api = client(tiny_server)
    prompt = [5, 17, 33, 2, 90, 41, 7, 8] * 5  # 40 tokens: 2 full blocks of 16
    first = api.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=6, temperature=0)
    again = api.completions.create(model=TINY_NAME, prompt=prompt, max_tokens=6, temperature=0)
    assert first.choices[0].finish_reason in ("length", "stop")
    assert first.choices[0].text == again.choices[0].text
    assert first.usage is not None and again.usage is not None
    assert first.usage.prompt_tokens == 40
    assert again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == 32


def test_n2_and_logprobs(tiny_server: str) -> None:
    result = client(tiny_server).completions.create(
        model=TINY_NAME, prompt=[3, 4, 5, 6], max_tokens=4, n=2, temperature=1.0, seed=1,
        logprobs=3,
    )  # fmt: skip
    assert sorted(c.index for c in result.choices) == [0, 1]
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.top_logprobs is not None
    assert all(1 <= len(top) <= 4 for top in logprobs.top_logprobs)


def test_streamed_completion_equals_the_whole_one(tiny_server: str) -> None:
    api = client(tiny_server)
    kwargs: dict[str, Any] = dict(model=TINY_NAME, prompt=[9, 8, 7], max_tokens=8, temperature=0)
    whole = api.completions.create(**kwargs)
    chunks = list(api.completions.create(stream=True, stream_options={"include_usage": True},
                                         **kwargs))  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_sse_framing_ends_with_done(tiny_server: str) -> None:
    body = {"model": TINY_NAME, "prompt": [1, 2, 3], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{tiny_server}/v1/completions", json=body, timeout=60) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        frames = [line for line in reply.iter_lines() if line]
    assert frames[-1] == "data: [DONE]"
    for frame in frames[:-1]:
        assert frame.startswith("data: ")
        assert json.loads(frame.removeprefix("data: "))["object"] == "text_completion"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "prompt": [1]}, 404, "model"),
        ({"prompt": [1], "max_tokens": 500}, 400, "max_tokens"),
        ({"prompt": [1] * 200}, 400, "prompt"),
        ({"prompt": [1], "temperature": -1}, 400, "temperature"),
        ({"prompt": [1], "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": [99999]}, 400, "prompt_token_ids"),
        ({}, 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(
    tiny_server: str, body: dict[str, Any], status: int, param: str
) -> None:
    reply = httpx.post(f"{tiny_server}/v1/completions", json=body, timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_malformed_json_is_400(tiny_server: str) -> None:
    reply = httpx.post(
        f"{tiny_server}/v1/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert reply.status_code == 400
    assert "error" in reply.json()


def test_prompt_too_long_states_both_numbers(tiny_server: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(tiny_server).completions.create(model=TINY_NAME, prompt=[1] * 200, max_tokens=1)
    assert "200" in str(caught.value) and "128" in str(caught.value)


def test_disconnect_mid_stream_frees_the_blocks(tiny_server: str) -> None:
    body = {"prompt": [4] * 20, "max_tokens": 100, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{tiny_server}/v1/completions", json=body, timeout=60) as reply:
        for _ in zip(range(3), reply.iter_lines(), strict=False):
            pass  # read a few frames, then hang up
    client(tiny_server).completions.create(model=TINY_NAME, prompt=[1, 2], max_tokens=2)
    # the server keeps serving; a chat request to a model without a tokenizer is a clean 400
    with pytest.raises(openai.BadRequestError):
        client(tiny_server).chat.completions.create(
            model=TINY_NAME, messages=[{"role": "user", "content": "hi"}]
        )
    wait_until_idle(tiny_server)  # the stream hung up is aborted: no block stays held


@pytest.mark.slow
def test_chat_on_the_default_model(tmp_path: Path) -> None:
    with ServerProcess(["--max-model-len", "512"], tmp_path / "server.log") as server:
        api = client(server.base_url)
        (name,) = [m.id for m in api.models.list().data]
        assert name == "SmolLM2-135M-Instruct"
        messages: list[Any] = [{"role": "user", "content": "Say hello in one word."}]
        reply = api.chat.completions.create(
            model=name, messages=messages, max_tokens=12, temperature=0
        )
        text = reply.choices[0].message.content
        assert text and reply.choices[0].message.role == "assistant"
        chunks = list(api.chat.completions.create(
            model=name, messages=messages, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        ))  # fmt: skip
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        usage = chunks[-1].usage
        assert usage is not None
        assert usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens > 0  # same prompt as the first call
        stopped = api.chat.completions.create(
            model=name, messages=messages, max_tokens=12, temperature=0, stop=[text[-2:]]
        )
        assert not (stopped.choices[0].message.content or "").endswith(text[-2:])


def test_metrics_use_vllm_names_and_kv_usage_returns_to_zero(tiny_server: str) -> None:
    client(tiny_server).completions.create(model=TINY_NAME, prompt=[2] * 40, max_tokens=3)
    text = httpx.get(f"{tiny_server}/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_count"):  # fmt: skip
        assert f"kvserve:{name}" in text, name
    assert metric(tiny_server, "generation_tokens_total") >= 3
    assert metric(tiny_server, "kv_cache_usage_perc") == 0.0


def test_hung_up_streams_are_aborted_and_free_their_blocks(tiny_server: str) -> None:
    body = {"prompt": [4] * 20, "max_tokens": 100, "stream": True, "ignore_eos": True}
    for _ in range(3):
        with httpx.stream("POST", f"{tiny_server}/v1/completions", json=body, timeout=60) as r:
            for _ in zip(range(3), r.iter_lines(), strict=False):
                pass
    wait_until_idle(tiny_server)


def test_api_key_public_metrics_and_a_clean_exit(tiny_llama: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_llama), "--max-model-len", "128", "--num-kv-blocks", "64",
            "--api-key", "sesame", "--public-metrics", "--served-model-name", "tiny"]  # fmt: skip
    server = ServerProcess(args, tmp_path / "server.log")
    base = server.start()
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        api = openai.OpenAI(base_url=f"{base}/v1", api_key="sesame", max_retries=0)
        assert len(api.models.list().data) == 1
        api.completions.create(
            model="tiny", prompt=[1, 2], max_tokens=2, extra_body={"ignore_eos": True}
        )
        assert httpx.get(f"{base}/health").status_code == 200  # no key needed
        assert metric(base, "generation_tokens_total") == 2  # nor for /metrics here
    finally:
        assert server.stop() == 0  # SIGTERM: clean exit


class OneSeat(NamedTuple):
    base: str
    gate: StepGate
    engine: AsyncEngine


@pytest.fixture
def one_seat(tiny_llama: Path) -> Iterator[OneSeat]:
    """A server in this process with one seat (`max_num_seqs` 1, `--max-queue-len 0`) whose
    engine steps only when the test allows it."""
    engine = make_engine(str(tiny_llama), num_kv_blocks=64, max_num_seqs=1)
    gate = StepGate(engine)
    async_engine = AsyncEngine(engine)
    with serve_in_thread(async_engine, limits=ServerLimits(max_queue_len=0)) as base:
        try:
            yield OneSeat(base, gate, async_engine)
        finally:
            gate.open()  # nothing waits on a held step while the server stops


def test_a_full_server_answers_429_until_the_seat_is_free(one_seat: OneSeat) -> None:
    base, gate, _ = one_seat
    url = f"{base}/v1/completions"
    long = {"prompt": [4] * 10, "max_tokens": 100, "stream": True, "ignore_eos": True}
    first = send_post(port_of(base), "/v1/completions", long)
    wait_for(lambda: metric(base, "num_requests_waiting") == 1, "the first request is queued")
    # no step runs: the first request holds the only seat however fast the machine is
    small = {"prompt": [1, 2], "max_tokens": 2}
    second = httpx.post(url, json=small, timeout=60)
    assert second.status_code == 429
    assert second.headers["retry-after"] == "1"
    assert second.json()["error"]["type"] == "overloaded"
    first.close()  # hang up
    gate.open()
    # the seat is free again once the server has seen the first client hang up
    wait_for(lambda: httpx.post(url, json=small, timeout=60).status_code == 200, "a free seat")
    wait_until_idle(base)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_whose_client_hangs_up_is_aborted(one_seat: OneSeat, stream: bool) -> None:
    base, gate, engine = one_seat
    long = {"prompt": [4] * 10, "max_tokens": 100, "ignore_eos": True, "stream": stream}
    gate.allow(3)
    client_socket = send_post(port_of(base), "/v1/completions", long)
    wait_for(lambda: gate.num_steps == 3, "three steps of the request")
    assert metric(base, "num_requests_running") == 1
    client_socket.close()  # hang up while the engine waits to take its fourth step
    wait_for(lambda: engine.num_unfinished == 0, "the server sees the hang-up")
    gate.open()
    wait_until_idle(base)  # aborted: no request left, every KV block free
    # it stopped within a step of the hang-up, far short of its 100 tokens
    assert metric(base, "generation_tokens_total") in (3, 4)
