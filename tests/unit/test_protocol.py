"""Request bodies -> SamplingParams: OpenAI's strict types and every field's fate, no server."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kvserve.sampling_params import StructuredOutputParams
from kvserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    describe_validation_error,
)

CHAT = [{"role": "user", "content": "hi"}]


def _invalid(model: Any, body: dict[str, Any]) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return describe_validation_error(caught.value.errors())


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": "10"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "x", "temperature": float("inf")}, "temperature"),
        ({"prompt": "x", "temperature": float("nan")}, "temperature"),
        ({"prompt": "x", "temperature": "0.5"}, "temperature"),
        ({"prompt": "x", "n": False}, "n"),
        ({"prompt": "x", "stop": [1]}, "stop[0]"),
        ({"prompt": "x", "logit_bias": {"5": "a"}}, "logit_bias.5"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "echo": 1}, "echo"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt[1]"),
        ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
        ({"prompt": "x", "response_format": {"type": "xml"}}, "response_format.type"),
    ],
)
def test_completion_types_are_strict(body: dict[str, Any], param: str) -> None:
    message, got = _invalid(CompletionRequest, body)
    assert got == param, message
    assert message.startswith(f"{param}: ")


def test_unknown_field_is_named() -> None:
    message, _ = _invalid(CompletionRequest, {"prompt": "x", "frobnicate": 1})
    assert message == "frobnicate: unrecognized request argument"


def test_union_failure_lists_the_accepted_types() -> None:
    message, _ = _invalid(CompletionRequest, {"prompt": 5})
    assert message == "prompt: expected str or list[int] or list[str] or list[list[int]]"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].type",
        ),
        ({"messages": CHAT, "max_completion_tokens": "5"}, "max_completion_tokens"),
        ({"messages": CHAT, "logprobs": 1}, "logprobs"),
        ({"messages": CHAT, "top_logprobs": 2.0}, "top_logprobs"),
    ],
)
def test_chat_types_are_strict(body: dict[str, Any], param: str) -> None:
    assert _invalid(ChatCompletionRequest, body)[1] == param


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"suffix": "tail"}, "suffix"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"best_of": 3, "stream": True}, "best_of"),
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"best_of": 99}, "best_of"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"guided_regex": "a+", "guided_choice": ["x"]}, "guided_choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ],
)
def test_completion_values_rejected_naming_the_field(body: dict[str, Any], field: str) -> None:
    request = CompletionRequest.model_validate({"prompt": "x", **body})
    with pytest.raises(ValueError, match=rf"^{field}: "):
        request.completion_params(max_n=16)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": []}, "functions"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "logprobs"),
        ({"messages": []}, "messages"),
        ({"presence_penalty": 3}, "presence_penalty"),
    ],
)
def test_chat_values_rejected_naming_the_field(body: dict[str, Any], field: str) -> None:
    request = ChatCompletionRequest.model_validate({"messages": CHAT, **body})
    with pytest.raises(ValueError, match=rf"^{field}: "):
        request.chat_params(max_n=16)


def test_completion_params_map_every_field() -> None:
    body = {
        "prompt": "x", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "n": 2, "best_of": 3,
        "stop": "END", "seed": 4, "presence_penalty": 0.1, "frequency_penalty": 0.2,
        "logit_bias": {"12": -100, "7": 5.5}, "top_k": 5, "min_p": 0.05,
        "repetition_penalty": 1.1, "min_tokens": 1, "ignore_eos": True, "stop_token_ids": [9],
        "logprobs": 2, "echo": True, "user": "u", "cache_salt": "tenant",
    }  # fmt: skip
    params, n = CompletionRequest.model_validate(body).completion_params(max_n=16)
    assert n == 2 and params.n == 3
    assert (params.max_tokens, params.temperature, params.top_p) == (7, 0.5, 0.9)
    assert params.stop == ["END"] and params.stop_token_ids == [9] and params.seed == 4
    assert params.logit_bias == {12: -100.0, 7: 5.5}
    assert (params.top_k, params.min_p, params.repetition_penalty) == (5, 0.05, 1.1)
    assert (params.presence_penalty, params.frequency_penalty) == (0.1, 0.2)
    assert params.min_tokens == 1 and params.ignore_eos
    assert params.logprobs == 2 and params.prompt_logprobs == 2


def test_echo_with_max_tokens_0_generates_one_hidden_token() -> None:
    body = {"prompt": [1, 2, 3], "echo": True, "max_tokens": 0, "logprobs": 1}
    params, n = CompletionRequest.model_validate(body).completion_params(max_n=16)
    assert params.max_tokens == 1 and params.prompt_logprobs == 1 and n == 1


def test_best_of_asks_for_cumulative_logprobs() -> None:
    body = {"prompt": "x", "best_of": 4}
    params, n = CompletionRequest.model_validate(body).completion_params(max_n=16)
    assert params.n == 4 and n == 1 and params.logprobs == 0


def test_batch_prompts() -> None:
    assert CompletionRequest.model_validate({"prompt": ["a", "b"]}).prompts(64) == ["a", "b"]
    assert CompletionRequest.model_validate({"prompt": [[1], [2, 3]]}).prompts(64) == [[1], [2, 3]]
    assert CompletionRequest.model_validate({"prompt": [1, 2]}).prompts(64) == [[1, 2]]
    with pytest.raises(ValueError, match="^prompt: 3 prompts"):
        CompletionRequest.model_validate({"prompt": ["a", "b", "c"]}).prompts(2)
    with pytest.raises(ValueError, match="^prompt: must not be empty"):
        CompletionRequest.model_validate({"prompt": []}).prompts(64)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutputParams(json_object=True)),
        (
            {"response_format": {"type": "json_schema",
                                 "json_schema": {"name": "p", "schema": {"type": "integer"},
                                                 "strict": True}}},
            StructuredOutputParams(json={"type": "integer"}),
        ),
        ({"guided_regex": "[ab]+"}, StructuredOutputParams(regex="[ab]+")),
        ({"guided_choice": ["yes", "no"]}, StructuredOutputParams(choice=["yes", "no"])),
        ({"guided_json": {"type": "object"}}, StructuredOutputParams(json={"type": "object"})),
        ({"guided_grammar": "start: \"a\""}, StructuredOutputParams(grammar="start: \"a\"")),
    ],
)  # fmt: skip
def test_structured_output_sources(extra: dict[str, Any], expected: Any) -> None:
    params = ChatCompletionRequest.model_validate({"messages": CHAT, **extra}).chat_params(16)
    assert params.structured_output == expected


def test_chat_params() -> None:
    body = {"messages": CHAT, "max_completion_tokens": 5, "max_tokens": 9, "logprobs": True,
            "top_logprobs": 3, "parallel_tool_calls": False, "store": False}  # fmt: skip
    params = ChatCompletionRequest.model_validate(body).chat_params(max_n=16)
    assert params.max_tokens == 5 and params.logprobs == 3
    no_limit = ChatCompletionRequest.model_validate({"messages": CHAT}).chat_params(16)
    assert no_limit.max_tokens is None and no_limit.logprobs is None


def test_developer_role_is_system_for_the_template() -> None:
    body = {
        "messages": [
            {
                "role": "developer",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ]
    }
    message = ChatCompletionRequest.model_validate(body).messages[0]
    assert message.as_template_message() == {"role": "system", "content": "ab"}
