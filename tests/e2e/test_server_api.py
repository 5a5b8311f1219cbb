"""OpenAI API features over HTTP on a tiny checkpoint: batch prompts, echo with prompt
logprobs (lm-eval's exact request), best_of, logit_bias, streaming logprobs, cache_salt,
models.retrieve, unsupported fields. Values are checked against transformers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

from kvserve.bench.server_process import ServerProcess

NAME = "tiny"
CONTEXT = [5, 17, 33, 2, 90, 41, 7, 8, 61, 62, 63]
CONTINUATIONS = [[70, 71, 72], [80], [90, 91]]


@pytest.fixture(scope="module")
def tiny_model(make_tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_checkpoint("llama", tmp_path_factory.mktemp("api_model")))


@pytest.fixture(scope="module")
def server(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("api_server") / "server.log"
    args = ["--model", tiny_model, "--served-model-name", NAME, "--max-model-len", "128",
            "--num-kv-blocks", "96"]  # fmt: skip
    with ServerProcess(args, log) as process:
        yield process.base_url


@pytest.fixture(scope="module")
def hf_logprobs(tiny_model: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    @torch.inference_mode()
    def logprobs(ids: list[int]) -> torch.Tensor:
        """(len(ids), vocab) log-softmax rows; row i predicts token i + 1."""
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


def api(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def post(base: str, route: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{base}/v1/{route}", json=body, timeout=60)


def test_lm_eval_loglikelihood_request(server: str, hf_logprobs: Any) -> None:
    """What lm-eval's `local-completions` sends for a multiple-choice task (token-id prompts
    of context + continuation, echo, logprobs 1, max_tokens 1) and how it reads the reply."""
    prompts = [CONTEXT + continuation for continuation in CONTINUATIONS]
    body = {"model": NAME, "prompt": prompts, "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}  # fmt: skip
    reply = post(server, "completions", body)
    assert reply.status_code == 200, reply.text
    choices = sorted(reply.json()["choices"], key=lambda choice: choice["index"])
    assert [choice["index"] for choice in choices] == [0, 1, 2]
    for choice, prompt in zip(choices, prompts, strict=True):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(prompt) + 1  # the prompt, then one new token
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        ctxlen = len(CONTEXT)
        summed = sum(logprobs["token_logprobs"][ctxlen:-1])
        rows = hf_logprobs(prompt)
        expected = sum(float(rows[i - 1, prompt[i]]) for i in range(ctxlen, len(prompt)))
        assert summed == pytest.approx(expected, abs=1e-4)
        for i in range(1, len(prompt)):
            assert logprobs["token_logprobs"][i] == pytest.approx(
                float(rows[i - 1, prompt[i]]), abs=1e-4
            )
            top = logprobs["top_logprobs"][i]
            assert max(top.values()) == pytest.approx(float(rows[i - 1].max()), abs=1e-4)
        is_greedy = all(
            lp == max(top.values())
            for lp, top in zip(logprobs["token_logprobs"][ctxlen:-1],
                               logprobs["top_logprobs"][ctxlen:-1], strict=True)
        )  # fmt: skip
        greedy = all(int(rows[i - 1].argmax()) == prompt[i] for i in range(ctxlen, len(prompt)))
        assert is_greedy == greedy


def test_echo_with_max_tokens_0_scores_the_prompt_only(server: str, hf_logprobs: Any) -> None:
    body = {"model": NAME, "prompt": CONTEXT, "max_tokens": 0, "echo": True, "logprobs": 2}
    reply = post(server, "completions", body)
    assert reply.status_code == 200, reply.text
    result = reply.json()
    choice = result["choices"][0]
    assert choice["text"] == ""  # a model without a tokenizer has no text, only token ids
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(CONTEXT)
    offsets = [0]
    for token in logprobs["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs["text_offset"] == offsets
    rows = hf_logprobs(CONTEXT)
    for i in range(1, len(CONTEXT)):
        top = logprobs["top_logprobs"][i]
        assert len(top) in (2, 3)  # the top 2 and the prompt token itself
        best = [f"token_id:{t}" for t in rows[i - 1].topk(2).indices.tolist()]
        assert list(top)[:2] == best
    assert result["usage"]["completion_tokens"] == 0
    assert choice["finish_reason"] == "length"


def test_batch_prompts_with_n_are_indexed_like_openai(server: str) -> None:
    prompts = [[3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14]]
    batch = api(server).completions.create(
        model=NAME, prompt=prompts, max_tokens=5, n=2, temperature=0.8, seed=3
    )
    assert [choice.index for choice in batch.choices] == list(range(6))
    for i, prompt in enumerate(prompts):
        alone = api(server).completions.create(
            model=NAME, prompt=prompt, max_tokens=5, n=2, temperature=0.8, seed=3
        )
        assert [c.text for c in batch.choices[2 * i : 2 * i + 2]] == [c.text for c in alone.choices]
    assert batch.usage is not None and batch.usage.prompt_tokens == 12
    assert batch.usage.completion_tokens == 30


def test_best_of_returns_the_most_likely_sample(server: str) -> None:
    common = dict(model=NAME, prompt=[3, 1, 4, 1, 5], max_tokens=6, temperature=1.0, seed=11)
    every = api(server).completions.create(n=4, logprobs=0, **common)  # type: ignore[arg-type]
    scores = []
    for choice in every.choices:
        assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
        scores.append(sum(lp for lp in choice.logprobs.token_logprobs if lp is not None))
    best = api(server).completions.create(n=1, best_of=4, **common)  # type: ignore[arg-type]
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    assert best.choices[0].text == every.choices[scores.index(max(scores))].text


def test_logit_bias_forces_and_bans(server: str) -> None:
    body = {"model": NAME, "prompt": CONTEXT, "max_tokens": 4, "temperature": 0,
            "logit_bias": {"42": 100}, "logprobs": 1}  # fmt: skip
    forced = post(server, "completions", body).json()["choices"][0]
    assert forced["logprobs"]["tokens"] == ["token_id:42"] * 4
    plain = post(server, "completions", {**body, "logit_bias": None}).json()["choices"][0]
    first = plain["logprobs"]["tokens"][0]
    banned_body = {**body, "logit_bias": {first.removeprefix("token_id:"): -100}}
    banned = post(server, "completions", banned_body).json()["choices"][0]
    assert banned["logprobs"]["tokens"][0] != first


def test_streamed_logprobs_equal_the_whole_reply(server: str) -> None:
    common = dict(model=NAME, prompt=[9, 8, 7, 6], max_tokens=6, temperature=0, logprobs=3)
    whole = api(server).completions.create(**common)  # type: ignore[arg-type]
    chunks = list(api(server).completions.create(stream=True, **common))  # type: ignore[arg-type]
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    offsets: list[int] = []
    for chunk in chunks:
        for choice in chunk.choices:
            assert choice.logprobs is not None
            tokens += choice.logprobs.tokens or []
            token_logprobs += choice.logprobs.token_logprobs or []
            offsets += choice.logprobs.text_offset or []
    assert whole.choices[0].logprobs is not None
    assert tokens == whole.choices[0].logprobs.tokens
    assert token_logprobs == whole.choices[0].logprobs.token_logprobs
    assert offsets == whole.choices[0].logprobs.text_offset


def test_cache_salt_separates_tenants(server: str) -> None:
    prompt = [20 + i for i in range(40)]  # 2 full blocks of 16
    body = {"model": NAME, "prompt": prompt, "max_tokens": 1, "cache_salt": "a"}
    post(server, "completions", body)
    same = post(server, "completions", body).json()["usage"]["prompt_tokens_details"]
    other = post(server, "completions", {**body, "cache_salt": "b"}).json()["usage"]
    assert same["cached_tokens"] == 32
    assert other["prompt_tokens_details"]["cached_tokens"] == 0


def test_models_retrieve(server: str) -> None:
    assert api(server).models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        api(server).models.retrieve("no-such-model")


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("completions", {"prompt": [1, 2], "suffix": "x"}, "suffix"),
        ("completions", {"prompt": [1, 2], "max_tokens": "3"}, "max_tokens"),
        ("completions", {"prompt": [1, 2], "temperature": True}, "temperature"),
        ("completions", {"prompt": [1, 2], "unknown_field": 1}, "unknown_field"),
        ("completions", {"prompt": [1, 2], "logit_bias": {"999": 1}}, "logit_bias"),
        ("completions", {"prompt": [[1, 2], [1, 999]]}, "prompt_token_ids"),
        ("chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, "tools"),
    ],
)  # fmt: skip
def test_bad_fields_are_400_naming_them(
    server: str, route: str, body: dict[str, Any], param: str
) -> None:
    reply = post(server, route, {"model": NAME, **body})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    assert reply.json()["error"]["type"] == "invalid_request_error"


def test_raw_infinity_is_400(server: str) -> None:
    raw = b'{"model": "tiny", "prompt": [1, 2], "temperature": Infinity}'
    reply = httpx.post(
        f"{server}/v1/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "temperature"
    assert json.loads(reply.text)["error"]["message"].startswith("temperature: ")
