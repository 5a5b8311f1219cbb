"""Prefill/decode disaggregation: `kvserve cluster --prefill-replicas 1 --decode-replicas 1`
(cluster/handoff.py) answers as one engine does, with the prompt's KV handed from the prefill
engine to the decode engine through Ray's object store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvserve.bench.server_process import ServerProcess
from kvserve.sampling_params import SamplingParams
from tests.e2e.conftest import CHATML, VOCAB_SIZE
from tests.helpers import make_engine, run_engine
from tests.server_helpers import port_of, send_post, wait_until_idle
from tests.tiny_tokenizer import save_tiny_tokenizer

NAME = "tiny"


@pytest.fixture(scope="module")
def model(make_tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(
        make_tiny_checkpoint("llama", tmp_path_factory.mktemp("pd_model"), vocab_size=VOCAB_SIZE)
    )
    save_tiny_tokenizer(folder, chat_template=CHATML)
    return folder


@pytest.fixture(scope="module")
def pd_cluster(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("pd") / "cluster.log"
    args = ["--model", str(model), "--served-model-name", NAME, "--max-model-len", "128",
            "--num-kv-blocks", "64", "--prefill-replicas", "1", "--decode-replicas", "1",
            "--replica-cpus", "1", "--kv-restore", "always",
            "--slo-ttft-ms", "86400000", "--slo-tpot-ms", "86400000"]  # fmt: skip
    # objectives of a day: every request meets them, through the reservation of its decode
    # seat (cluster/admission.py), released where the request ends on the prefill engine
    with ServerProcess(args, log, start_timeout_s=300, command="cluster") as server:
        yield server.base_url


def counter(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith(f"kvserve:{name} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no kvserve:{name}")


PROMPTS = [[5, 17, 33, 2, 90, 41, 7, 8] * 5, [101, 7, 7, 64, 3], [9, 10, 11] * 12]
CASES = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=12, logprobs=2),
    "seeded n=2": SamplingParams(temperature=0.9, top_p=0.9, seed=1234, n=2, max_tokens=12),
    "one token": SamplingParams(temperature=0.0, max_tokens=1),
}


@pytest.mark.parametrize("case", CASES)
def test_outputs_equal_one_engine(pd_cluster: str, model: Path, case: str) -> None:
    params = CASES[case]
    expected = run_engine(make_engine(str(model), max_model_len=128), PROMPTS, params)
    api = openai.OpenAI(base_url=f"{pd_cluster}/v1", api_key="unused", max_retries=0)
    handed_before = counter(pd_cluster, "kv_transfer_requests_total")
    for prompt, output in zip(PROMPTS, expected, strict=True):
        reply = api.completions.create(
            model=NAME,
            prompt=prompt,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            n=params.n,
            logprobs=params.logprobs,
            extra_body={"seed": params.seed, "top_p": params.top_p},
        )
        choices = sorted(reply.choices, key=lambda c: c.index)
        assert [c.text for c in choices] == [o.text for o in output.outputs]
        assert [c.finish_reason for c in choices] == [o.finish_reason for o in output.outputs]
        assert reply.usage is not None
        assert reply.usage.completion_tokens == sum(len(o.token_ids) for o in output.outputs)
    handed = counter(pd_cluster, "kv_transfer_requests_total") - handed_before
    assert handed == (0 if params.max_tokens == 1 else len(PROMPTS))  # one token: P alone


def test_the_prompt_blocks_move_and_streaming_matches(pd_cluster: str, model: Path) -> None:
    prompt = [44, 45, 46, 47] * 10  # 40 tokens: 2 full blocks of 16 to hand over
    expected = run_engine(
        make_engine(str(model), max_model_len=128),
        [prompt],
        SamplingParams(temperature=0.0, max_tokens=10),
    )[0]
    blocks_before = counter(pd_cluster, "kv_transfer_blocks_total")
    api = openai.OpenAI(base_url=f"{pd_cluster}/v1", api_key="unused", max_retries=0)
    stream = api.completions.create(
        model=NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text == expected.outputs[0].text
    assert counter(pd_cluster, "kv_transfer_blocks_total") - blocks_before == 2
    assert counter(pd_cluster, "kv_transfer_bytes_total") > 0


def test_stop_strings_end_the_request_wherever_they_fall(pd_cluster: str, model: Path) -> None:
    engine = make_engine(str(model), max_model_len=128)
    full = (
        run_engine(engine, [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=12))[0]
        .outputs[0]
        .text
    )
    api = openai.OpenAI(base_url=f"{pd_cluster}/v1", api_key="unused", max_retries=0)
    for stop in {full[:2], full[4:7]} - {""}:  # in the first token's text, and later
        expected = run_engine(
            engine, [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=12, stop=[stop])
        )
        reply = api.completions.create(
            model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop]
        )
        assert reply.choices[0].text == expected[0].outputs[0].text
        assert reply.choices[0].finish_reason == expected[0].outputs[0].finish_reason


def test_a_client_hanging_up_frees_the_blocks_on_both_engines(pd_cluster: str) -> None:
    for _ in range(3):
        body = {"model": NAME, "prompt": [4] * 40, "max_tokens": 80, "stream": True,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        sock = send_post(port_of(pd_cluster), "/v1/completions", body)
        received = b""
        while b"data: " not in received:  # the first token: the handoff starts now
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
        sock.close()
    wait_until_idle(pd_cluster)  # KV usage 0 and nothing running, prefill and decode
