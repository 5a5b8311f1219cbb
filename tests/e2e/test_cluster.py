"""`kvserve cluster` on a local Ray started by the server process: two engine replicas of a
tiny llama behind one OpenAI endpoint, driven by the official openai client."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvserve.bench.server_process import ServerProcess
from kvserve.sampling_params import SamplingParams
from tests.helpers import make_engine, run_engine
from tests.server_helpers import port_of, send_post, wait_for, wait_until_idle

NAME = "tiny"
ENGINE_ARGS = ["--max-model-len", "128", "--num-kv-blocks", "64"]
DAY_MS = "86400000"  # SLO admission runs on every request, and admits every one


@pytest.fixture(scope="module")
def model(make_tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(make_tiny_checkpoint("llama", tmp_path_factory.mktemp("cluster_model")))


@pytest.fixture(scope="module")
def cluster(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("cluster") / "cluster.log"
    args = ["--model", str(model), "--served-model-name", NAME, *ENGINE_ARGS,
            "--replicas", "2", "--replica-cpus", "1", "--router", "cache-aware",
            "--slo-ttft-ms", DAY_MS, "--slo-tpot-ms", DAY_MS]  # fmt: skip
    with ServerProcess(args, log, start_timeout_s=300, command="cluster") as server:
        yield server


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def samples(base: str, prefix: str) -> dict[str, float]:
    """Every sample of /metrics whose name starts with `kvserve:<prefix>`, by its full text."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(f"kvserve:{prefix}")
    }


def indexed_blocks(base: str) -> list[float]:
    found = samples(base, "cluster_replica_indexed_blocks")
    return [found[f'kvserve:cluster_replica_indexed_blocks{{replica="{i}"}}'] for i in (0, 1)]


def routed(base: str) -> dict[str, float]:
    return samples(base, "cluster_routed_requests_total")


def test_health_reports_both_replicas(cluster: ServerProcess) -> None:
    reply = httpx.get(f"{cluster.base_url}/health")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok", "replicas": 2, "replicas_up": 2}
    assert [m.id for m in client(cluster.base_url).models.list().data] == [NAME]


def test_cache_aware_routing_sends_a_repeated_prefix_to_the_replica_holding_it(
    cluster: ServerProcess,
) -> None:
    base, api = cluster.base_url, client(cluster.base_url)
    wait_until_idle(base)
    before = indexed_blocks(base)
    first = [11, 12, 13, 14, 15, 16, 17, 18] * 5  # 40 tokens: 2 full blocks of 16
    api.completions.create(model=NAME, prompt=first, max_tokens=4, temperature=0)
    # the replica that ran it announces its blocks (KV events) at the next poll
    wait_for(lambda: indexed_blocks(base) != before, "the replicas' block index to grow")
    holder = max((0, 1), key=lambda i: indexed_blocks(base)[i] - before[i])
    key = f'kvserve:cluster_routed_requests_total{{reason="prefix",replica="{holder}"}}'
    hits_before = routed(base).get(key, 0.0)
    again = api.completions.create(model=NAME, prompt=first[:36] + [3, 2, 1], max_tokens=4)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == 32  # both blocks, on `holder`
    assert routed(base)[key] == hits_before + 1


def test_outputs_equal_one_engine_greedy_and_seeded(cluster: ServerProcess, model: Path) -> None:
    prompts = [[5, 17, 33, 2, 90, 41, 7, 8] * 3, [101, 7, 7, 64, 3], [9] * 20]
    params = [
        SamplingParams(temperature=0.0, max_tokens=12),
        SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=12),
    ]
    expected = [
        run_engine(make_engine(str(model), max_model_len=128), prompts, p, check=False)
        for p in params
    ]
    api = client(cluster.base_url)
    for param, outputs in zip(params, expected, strict=True):
        for prompt, output in zip(prompts, outputs, strict=True):
            extra = {} if param.seed is None else {"seed": param.seed, "top_p": param.top_p}
            reply = api.completions.create(
                model=NAME,
                prompt=prompt,
                max_tokens=12,
                temperature=param.temperature,
                logprobs=1,
                **extra,  # type: ignore[arg-type]
            )
            choice = reply.choices[0]
            assert choice.logprobs is not None and choice.logprobs.tokens is not None
            assert len(choice.logprobs.tokens) == len(output.outputs[0].token_ids)
            assert choice.text == output.outputs[0].text
    assert samples(cluster.base_url, "slo_rejections_total") == {}  # a day: all admitted


def test_a_client_hanging_up_mid_stream_frees_the_blocks_on_its_replica(
    cluster: ServerProcess,
) -> None:
    base = cluster.base_url
    body = {"model": NAME, "prompt": [4] * 40, "max_tokens": 80, "stream": True,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    sock = send_post(port_of(base), "/v1/completions", body)
    read_first_event(sock)  # it streams: its replica holds its blocks
    sock.close()
    wait_until_idle(base)  # KV usage 0, nothing running or waiting, on every replica


def test_a_killed_replica_is_restarted_and_the_cluster_keeps_answering(
    cluster: ServerProcess,
) -> None:
    base, api = cluster.base_url, client(cluster.base_url)
    prompt = [21, 22, 23, 24] * 6
    before = api.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    assert cluster.process is not None
    replicas = replica_pids(cluster.process.pid)
    assert len(replicas) == 2
    body = {"model": NAME, "prompt": [4] * 8, "max_tokens": 119, "stream": True,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    sock = send_post(port_of(base), "/v1/completions", body)
    read_first_event(sock)
    for pid in replicas:  # frozen at once (118 tokens to go), then every replica dies
        os.kill(pid, signal.SIGSTOP)
    for pid in replicas:
        os.kill(pid, signal.SIGKILL)
    tail = read_until_closed(sock)
    events = [json.loads(line[6:]) for line in tail.split(b"\n") if line.startswith(b"data: {")]
    assert any("error" in event and "replica" in event["error"]["message"] for event in events)
    # the router sends nothing to a replica until it answers again (503 while none does)
    wait_for(lambda: httpx.get(f"{base}/health").json()["replicas_up"] == 2, "restarts", 240)
    assert len(replica_pids(cluster.process.pid)) == 2
    after = api.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    assert after.choices[0].text == before.choices[0].text


def test_a_request_whose_replica_dies_before_answering_is_retried_on_another(
    cluster: ServerProcess,
) -> None:
    """A request routed (by its prefix) to a replica that is frozen, then killed, before it
    answered: the client still gets the whole answer, from the other replica."""
    base, api = cluster.base_url, client(cluster.base_url)
    assert cluster.process is not None
    wait_for(lambda: httpx.get(f"{base}/health").json()["replicas_up"] == 2, "both up", 240)
    prompt = [61, 62, 63, 64, 65, 66, 67, 68] * 5  # 2 full blocks: routed to their holder
    expected = api.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0)
    wait_for(lambda: sum(indexed_blocks(base)) >= 2, "the replicas' block index")
    with ThreadPoolExecutor(1) as pool:
        for pid in replica_pids(cluster.process.pid):  # freeze one; the holder if it hangs
            os.kill(pid, signal.SIGSTOP)
            reply = pool.submit(
                api.completions.create, model=NAME, prompt=prompt, max_tokens=6, temperature=0
            )
            try:
                done = reply.result(timeout=20)  # not the holder: answered at once
            except TimeoutError:
                break
            assert done.choices[0].text == expected.choices[0].text
            os.kill(pid, signal.SIGCONT)
        else:
            raise AssertionError("no replica held the prompt's blocks")
        os.kill(pid, signal.SIGKILL)  # the frozen holder dies with the request unanswered
        assert reply.result(timeout=120).choices[0].text == expected.choices[0].text
    wait_for(lambda: httpx.get(f"{base}/health").json()["replicas_up"] == 2, "restarts", 240)


def replica_pids(server_pid: int) -> list[int]:
    """Live `ray::EngineReplica` processes descended from the server (its local Ray)."""
    parents: dict[int, int] = {}
    names: dict[int, bytes] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            names[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])

    def descends(pid: int) -> bool:
        while pid in parents and pid != server_pid:
            pid = parents[pid]
        return pid == server_pid

    return [
        pid for pid in parents if names[pid].startswith(b"ray::EngineReplica") and descends(pid)
    ]


def read_first_event(sock: Any) -> bytes:
    """Read past the response head until the first server-sent event."""
    received = b""
    while b"data: " not in received:
        chunk = sock.recv(65536)
        assert chunk, f"closed before any event: {received!r}"
        received += chunk
    return received


def read_until_closed(sock: Any) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received
