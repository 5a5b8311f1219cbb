"""`kvserve cluster` over a shared Redis tier (a real `redis-server`): a prefix computed on one
replica is restored on another, which never computed it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvserve.bench.server_process import ServerProcess
from tests.redis_server import RedisServer
from tests.server_helpers import wait_for


@pytest.fixture(scope="module")
def redis_tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("cluster_redis")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(
    make_tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory, redis_tier: RedisServer
) -> Iterator[str]:
    root = tmp_path_factory.mktemp("cluster_tier")
    model = Path(make_tiny_checkpoint("llama", root))
    # round-robin: the second request goes to the other replica whatever it holds
    args = ["--model", str(model), "--served-model-name", "tiny", "--max-model-len", "128",
            "--num-kv-blocks", "64", "--replicas", "2", "--replica-cpus", "1",
            "--router", "round-robin", "--kv-remote-url", redis_tier.url]  # fmt: skip
    with ServerProcess(args, root / "cluster.log", 300, command="cluster") as server:
        yield server.base_url


def test_a_prefix_computed_on_one_replica_is_restored_on_the_other(
    cluster: str, redis_tier: RedisServer
) -> None:
    api = openai.OpenAI(base_url=f"{cluster}/v1", api_key="unused", max_retries=0)
    prompt = [31, 32, 33, 34, 35, 36, 37, 38] * 5  # 40 tokens: 2 full blocks of 16
    first = api.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # the first replica writes its blocks to Redis in the background
    wait_for(lambda: redis_tier.client().dbsize() >= 2, "both blocks written to Redis")
    again = api.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == 32  # read from Redis
    assert again.choices[0].text == first.choices[0].text
    routed = httpx.get(f"{cluster}/metrics", timeout=30).text
    for replica in (0, 1):  # one request each: the second replica had never seen the prompt
        assert f'reason="turn",replica="{replica}"}} 1.0' in routed
