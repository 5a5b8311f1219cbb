"""The one stream loop (`streaming.chunks`) with each endpoint's formatting, without a server:
exact chunks from a scripted run of outputs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.server import streaming
from kvserve.server.endpoints import ChatEndpoint, CompletionEndpoint, Endpoint

HEAD = {"id": "r", "object": "x", "created": 0, "model": "m"}


def output(text: str, token_ids: list[int], finish: str | None = None) -> RequestOutput:
    c = CompletionOutput(0, text, token_ids, finish_reason=finish)
    return RequestOutput("r", "Hi", [7, 8], [c], finish is not None, num_cached_tokens=1)


def stream_of(endpoint: Endpoint, outputs: list[RequestOutput]) -> list[dict[str, Any]]:
    async def rest() -> AsyncGenerator[RequestOutput, None]:
        for item in outputs[1:]:
            yield item

    async def collect() -> list[dict[str, Any]]:
        runs = [streaming.Run(outputs[0], rest())]
        return [chunk async for chunk in streaming.chunks(HEAD, endpoint, runs, True)]

    return asyncio.run(collect())


# the first output has no token yet; the third moved nothing; the last only finishes
SCRIPT = [output("", []), output("a", [1]), output("a", [1]), output("ab", [1, 2]),
          output("ab", [1, 2], "length")]  # fmt: skip
USAGE = {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4,
         "prompt_tokens_details": {"cached_tokens": 1}}  # fmt: skip


def test_chat_chunks_send_the_role_first_and_skip_updates_that_moved_nothing() -> None:
    chunks = stream_of(ChatEndpoint(None, n=1, top=None), SCRIPT)
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks[:-1]]
    assert deltas == [
        ({"role": "assistant", "content": "a"}, None),
        ({"content": "b"}, None),
        ({"content": ""}, "length"),
    ]
    assert chunks[-1] == {**HEAD, "choices": [], "usage": USAGE}


def test_an_echoing_completion_sends_the_prompt_before_any_token() -> None:
    endpoint = CompletionEndpoint(None, n=1, echo=True, echo_only=False, logprobs=None,
                                  prompt_logprobs=False)  # fmt: skip
    chunks = stream_of(endpoint, SCRIPT)
    texts = [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks[:-1]]
    assert texts == [("Hi", None), ("a", None), ("b", None), ("", "length")]
    assert chunks[-1]["usage"] == USAGE


def test_whole_choices_of_both_endpoints() -> None:
    final = SCRIPT[-1]
    chat = ChatEndpoint(None, n=1, top=None).choice(0, final, final.outputs[0])
    assert chat == {"index": 0, "message": {"role": "assistant", "content": "ab"},
                    "logprobs": None, "finish_reason": "length", "stop_reason": None}  # fmt: skip
    endpoint = CompletionEndpoint(None, n=1, echo=False, echo_only=False, logprobs=None,
                                  prompt_logprobs=False)  # fmt: skip
    completion = endpoint.choice(3, final, final.outputs[0])
    assert completion == {"index": 3, "text": "ab", "logprobs": None,
                          "finish_reason": "length", "stop_reason": None}  # fmt: skip
