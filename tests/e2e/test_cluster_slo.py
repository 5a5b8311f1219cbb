"""SLO admission across `kvserve cluster`'s replicas (cluster/admission.py), end to end.

The predictions themselves are pinned with fixed rates in tests/unit/test_cluster_admission.py;
here the objective is set where no machine can be on the other side of it: a TTFT objective
of a nanosecond misses as soon as a replica has measured any prefill rate. (The cluster of
tests/e2e/test_cluster.py runs with objectives of a day, which every request meets.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvserve.bench.server_process import ServerProcess
from tests.server_helpers import assert_openai_error, wait_for

BODY = {"model": "tiny", "prompt": [5, 6, 7, 8] * 10, "max_tokens": 4}


def start_cluster(make_checkpoint: Any, root: Path, cluster_args: list[str]) -> ServerProcess:
    """A `kvserve cluster` of a tiny llama with `cluster_args` (replicas, objectives)."""
    model = make_checkpoint("llama", root)
    args = ["--model", str(model), "--served-model-name", "tiny", "--max-model-len", "128",
            "--num-kv-blocks", "64", "--replica-cpus", "1", *cluster_args]  # fmt: skip
    return ServerProcess(args, root / "cluster.log", 300, command="cluster")


@pytest.fixture(scope="module")
def strict_cluster(
    make_tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    root = tmp_path_factory.mktemp("cluster_slo")
    args = ["--replicas", "2", "--slo-ttft-ms", "0.000001"]
    with start_cluster(make_tiny_checkpoint, root, args) as server:
        yield server.base_url


def prompt_tokens(base: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith("kvserve:prompt_tokens_total"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no kvserve:prompt_tokens_total")


def test_requests_predicted_to_miss_on_every_replica_get_429_before_any_prefill(
    strict_cluster: str,
) -> None:
    base = strict_cluster
    url = f"{base}/v1/completions"
    # Once a replica has measured a prefill rate (its warm-up may have), nothing meets 1 ns.
    wait_for(lambda: httpx.post(url, json=BODY, timeout=60).status_code == 429, "a 429", 60)
    before = prompt_tokens(base)
    reply = httpx.post(url, json=BODY, timeout=60)
    error = assert_openai_error(reply, 429)
    assert "ttft" in error["message"].lower() or "first token" in error["message"].lower()
    assert reply.headers["retry-after"] == "1"
    assert prompt_tokens(base) == before  # no replica was sent any of it
    text = httpx.get(f"{base}/metrics", timeout=30).text
    assert 'kvserve:slo_rejections_total{model_name="tiny",objective="ttft"}' in text


@pytest.fixture(scope="module")
def strict_pd_cluster(
    make_tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    root = tmp_path_factory.mktemp("cluster_pd_slo")
    args = ["--prefill-replicas", "1", "--decode-replicas", "1", "--slo-tpot-ms", "0.000001"]
    with start_cluster(make_tiny_checkpoint, root, args) as server:
        yield server.base_url


def test_disaggregated_requests_are_refused_when_no_decode_engine_would_meet_the_tpot(
    strict_pd_cluster: str,
) -> None:
    """The decode seat is reserved before the prefill: once the decode engine has measured
    its step time, nothing meets a TPOT of a nanosecond, and nothing is prefilled."""
    base = strict_pd_cluster
    url = f"{base}/v1/completions"
    body = {**BODY, "max_tokens": 8}
    wait_for(lambda: httpx.post(url, json=body, timeout=60).status_code == 429, "a 429", 60)
    before = prompt_tokens(base)
    error = assert_openai_error(httpx.post(url, json=body, timeout=60), 429)
    assert "per output token" in error["message"]
    assert prompt_tokens(base) == before
    one_token = {**BODY, "max_tokens": 1}  # ends on the prefill engine: needs no seat
    assert httpx.post(url, json=one_token, timeout=60).status_code == 200
