"""Admission at arrival and the connection bound, against a real `kvserve serve`:
`--max-num-seqs 2 --max-queue-len 4` (6 seats), `--max-connections 100`."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kvserve.bench.server_process import ServerProcess
from tests.server_helpers import assert_openai_error, metric, port_of, wait_until_idle

MAX_QUEUE_LEN = 4
MAX_CONNECTIONS = 100


@pytest.fixture(scope="module")
def server(make_tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("admission")
    model = make_tiny_checkpoint("llama", root, max_position_embeddings=512)
    args = ["--model", str(model), "--max-model-len", "512", "--num-kv-blocks", "256",
            "--max-num-seqs", "2", "--max-queue-len", str(MAX_QUEUE_LEN),
            "--max-connections", str(MAX_CONNECTIONS), "--header-timeout", "120"]  # fmt: skip
    with ServerProcess(args, root / "server.log") as process:
        yield process.base_url


def test_a_burst_of_90_never_leaves_more_than_4_waiting(server: str) -> None:
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(metric(server, "num_requests_waiting"))
            time.sleep(0.01)

    async def one(http: httpx.AsyncClient, index: int) -> httpx.Response:
        # 400 tokens each: the first seats are still taken while the burst arrives
        body = {"prompt": [3 + index % 50, 7], "max_tokens": 400, "ignore_eos": True}
        return await http.post("/v1/completions", json=body)

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=90)
        async with httpx.AsyncClient(base_url=server, timeout=300, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(90)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        replies = asyncio.run(burst())
    finally:
        done.set()
        sampler.join()
    completed = [r for r in replies if r.status_code == 200]
    rejected = [r for r in replies if r.status_code == 429]
    assert len(completed) + len(rejected) == 90, {r.status_code for r in replies}
    assert completed and rejected  # 6 seats; 90 requests of 400 tokens arrive together
    for reply in completed:
        assert reply.json()["usage"]["completion_tokens"] == 400
    for reply in rejected:
        assert assert_openai_error(reply)["type"] == "overloaded"
        assert reply.headers["retry-after"] == "1"
    assert samples and max(samples) <= MAX_QUEUE_LEN, max(samples)
    wait_until_idle(server)


def test_the_connection_bound_answers_503(server: str) -> None:
    idle = [
        socket.create_connection(("127.0.0.1", port_of(server))) for _ in range(MAX_CONNECTIONS)
    ]
    try:
        # accepted in order: the server has counted the idle ones before this request runs
        reply = httpx.get(f"{server}/v1/models", timeout=30)
        error = assert_openai_error(reply, 503)
        assert error["type"] == "overloaded" and reply.headers["retry-after"] == "1"
        assert reply.headers["connection"] == "close"
    finally:
        for sock in idle:
            sock.close()
    deadline, status = time.monotonic() + 30, 503
    while status == 503 and time.monotonic() < deadline:  # until it has seen them close
        status = httpx.get(f"{server}/v1/models", timeout=30).status_code
        time.sleep(0.05)
    assert status == 200
