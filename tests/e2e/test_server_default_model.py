"""The default model behind `kvserve serve`, driven by the openai SDK: structured output on
both routes, chat logprobs streamed, and lm-eval's log-likelihood request against
transformers on the same weights."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

from kvserve.bench.server_process import ServerProcess
from kvserve.default_model import resolve_default_model

pytestmark = pytest.mark.slow

NAME = "smol"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("default_server") / "server.log"
    args = ["--served-model-name", NAME, "--max-model-len", "512"]
    with ServerProcess(args, log) as process:
        yield process.base_url


def api(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def check_person(person: Any) -> None:
    assert set(person) == {"name", "age", "role", "address"}
    assert isinstance(person["name"], str) and len(person["name"]) <= 20
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 120
    assert person["role"] in ("admin", "user", "guest")
    assert set(person["address"]) == {"city"} and isinstance(person["address"]["city"], str)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_chat_json_schema(server: str, temperature: float) -> None:
    reply = api(server).chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Describe a user of a web site as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
        temperature=temperature,
        seed=5,
        max_completion_tokens=200,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    check_person(json.loads(choice.message.content or ""))


def test_completion_structured_output(server: str) -> None:
    person = api(server).completions.create(
        model=NAME, prompt="A user of a web site, as JSON:", max_tokens=200, temperature=0,
        extra_body={"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "person", "schema": PERSON}}},
    )  # fmt: skip
    assert person.choices[0].finish_reason == "stop"
    check_person(json.loads(person.choices[0].text))
    obj = api(server).completions.create(
        model=NAME, prompt="A JSON object describing a cat:", max_tokens=200, temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )  # fmt: skip
    text = obj.choices[0].text
    assert text.startswith("{")  # nothing before the object, even if it runs out of tokens
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    pick = api(server).completions.create(
        model=NAME, prompt="Is the sky blue? Answer:", max_tokens=5, temperature=0,
        extra_body={"guided_choice": ["yes", "no"]},
    )  # fmt: skip
    assert pick.choices[0].text in ("yes", "no")


def test_chat_stream_logprobs_equal_whole(server: str) -> None:
    kwargs: dict[str, Any] = dict(
        model=NAME, messages=[{"role": "user", "content": "Name three colors."}],
        max_completion_tokens=12, temperature=0, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    whole = api(server).chat.completions.create(**kwargs)
    streamed = []
    for chunk in api(server).chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                streamed += choice.logprobs.content
    assert whole.choices[0].logprobs is not None and whole.choices[0].logprobs.content
    expected = whole.choices[0].logprobs.content
    assert [t.token for t in streamed] == [t.token for t in expected]
    # the second request reuses the first's cached prefix: equal up to float summation order
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in expected], abs=1e-4)
    assert all(len(t.top_logprobs) == 3 for t in expected)
    if whole.choices[0].finish_reason == "length":  # no EOS token (not part of the text)
        assert "".join(t.token for t in expected) == whole.choices[0].message.content


def test_lm_eval_request_matches_transformers(server: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvserve.default_model import default_gguf_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_default_model())
    gguf_folder, gguf_name = os.path.split(default_gguf_path())  # the converted folder's
    model = AutoModelForCausalLM.from_pretrained(  # weights are GGUF blocks: read the GGUF
        gguf_folder, gguf_file=gguf_name, dtype=torch.float32
    ).eval()
    context = tokenizer.encode("In the beginning God created")
    choices = [tokenizer.encode(" the heaven and the earth"), tokenizer.encode(" a small cat")]
    prompts = [context + choice for choice in choices]
    body = {"model": NAME, "prompt": prompts, "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}  # fmt: skip
    reply = httpx.post(f"{server}/v1/completions", json=body, timeout=120).json()
    for choice, prompt in zip(sorted(reply["choices"], key=lambda c: c["index"]), prompts,
                              strict=True):  # fmt: skip
        with torch.inference_mode():
            rows = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        expected = [float(rows[i - 1, prompt[i]]) for i in range(1, len(prompt))]
        got = choice["logprobs"]["token_logprobs"][1:-1]
        assert got == pytest.approx(expected, abs=1e-4)
