"""Admission at arrival (`max_num_seqs` 2 + `--max-queue-len 4`: 6 seats) and the connection
bound (`--max-connections 100`, against a real `kvserve serve`)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kvserve.bench.server_process import ServerProcess
from kvserve.server.async_engine import AsyncEngine
from kvserve.server.limits import ServerLimits
from tests.helpers import make_engine
from tests.server_helpers import (
    StepGate,
    assert_openai_error,
    port_of,
    serve_in_thread,
    wait_until_idle,
)

MAX_QUEUE_LEN = 4
MAX_CONNECTIONS = 100


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("admission") / "server.log"
    args = ["--model", str(tiny_llama), "--max-model-len", "128", "--num-kv-blocks", "64",
            "--max-connections", str(MAX_CONNECTIONS), "--header-timeout", "120"]  # fmt: skip
    with ServerProcess(args, log) as process:
        yield process.base_url


def test_a_burst_of_90_takes_6_seats_and_the_rest_get_429(tiny_llama: Path) -> None:
    """The burst arrives while no engine step may run (a server in this process, its steps
    held), so exactly the 6 seats are taken however fast the machine is."""
    engine = make_engine(str(tiny_llama), num_kv_blocks=64, max_num_seqs=2)
    gate = StepGate(engine)
    async_engine = AsyncEngine(engine)
    # the engine thread may be held in its first step before all 6 requests reach it; they
    # join the engine when the test lets that step run
    gate.before_step = async_engine._apply_commands
    limits = ServerLimits(max_queue_len=MAX_QUEUE_LEN)

    def held() -> tuple[int, int]:
        metrics = async_engine.get_metrics()
        return metrics.num_requests_running, metrics.num_requests_waiting

    async def one(http: httpx.AsyncClient, index: int) -> httpx.Response:
        body = {"prompt": [3 + index % 50, 7], "max_tokens": 20, "ignore_eos": True}
        return await http.post("/v1/completions", json=body)

    def num_done(replies: list[asyncio.Future[httpx.Response]]) -> int:
        return sum(reply.done() for reply in replies)

    async def burst(base: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=90)
        async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as http:
            replies = [asyncio.ensure_future(one(http, i)) for i in range(90)]
            while num_done(replies) < 84 or async_engine.num_unfinished != 6:
                await asyncio.sleep(0.02)  # bounded by the test's timeout: nothing can finish
            assert num_done(replies) == 84 and held()[0] == 0
            gate.allow(1)  # one step: 2 run, 4 wait
            while held() != (2, 4):
                await asyncio.sleep(0.02)
            gate.open()
            return await asyncio.gather(*replies)

    try:
        with serve_in_thread(async_engine, limits=limits) as base:
            replies = asyncio.run(asyncio.wait_for(burst(base), timeout=300))
            wait_until_idle(base)
    finally:
        gate.open()
    completed = [r for r in replies if r.status_code == 200]
    rejected = [r for r in replies if r.status_code == 429]
    assert (len(completed), len(rejected)) == (6, 84), {r.status_code for r in replies}
    for reply in completed:
        assert reply.json()["usage"]["completion_tokens"] == 20
    for reply in rejected:
        assert assert_openai_error(reply)["type"] == "overloaded"
        assert reply.headers["retry-after"] == "1"


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
