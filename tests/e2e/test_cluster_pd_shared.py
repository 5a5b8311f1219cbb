"""Prefill/decode disaggregation through the shared KV pool (`--kv-transfer shared-pool`): the
prefill engine's blocks go to a real Redis, the decode engine reads them there."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvserve.bench.server_process import ServerProcess
from kvserve.sampling_params import SamplingParams
from tests.helpers import make_engine, run_engine
from tests.redis_server import RedisServer


@pytest.fixture(scope="module")
def model(make_tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(make_tiny_checkpoint("llama", tmp_path_factory.mktemp("pd_shared_model")))


@pytest.fixture(scope="module")
def pd_cluster(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("pd_shared")
    with RedisServer(root / "redis") as redis_server:
        # --kv-restore always: the decode engine loads what it finds (pinned counts)
        args = ["--model", str(model), "--served-model-name", "tiny", "--max-model-len", "128",
                "--num-kv-blocks", "64", "--prefill-replicas", "1", "--decode-replicas", "1",
                "--replica-cpus", "1", "--kv-transfer", "shared-pool",
                "--kv-remote-url", redis_server.url,
                "--kv-restore", "always"]  # fmt: skip
        with ServerProcess(args, root / "cluster.log", 300, command="cluster") as server:
            yield server.base_url


def metric_sum(base: str, prefix: str) -> float:
    lines = httpx.get(f"{base}/metrics", timeout=30).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


def test_decode_reads_the_prompt_blocks_from_redis_and_answers_as_one_engine(
    pd_cluster: str, model: Path
) -> None:
    prompt = [61, 62, 63, 64] * 10  # 40 tokens: 2 full blocks of 16
    params = SamplingParams(temperature=0.0, max_tokens=10)
    expected = run_engine(make_engine(str(model), max_model_len=128), [prompt], params)[0]
    api = openai.OpenAI(base_url=f"{pd_cluster}/v1", api_key="unused", max_retries=0)
    reply = api.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert reply.choices[0].text == expected.outputs[0].text
    assert metric_sum(pd_cluster, "kvserve:kv_transfer_requests_total") == 1
    # the decode engine found both prompt blocks in Redis (the prefill engine wrote them)
    assert metric_sum(pd_cluster, 'kvserve:kv_tier_hits_total{model_name="tiny",tier="redis"}') == 2
