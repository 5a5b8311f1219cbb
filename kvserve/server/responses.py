"""The JSON of replies: choices, logprobs in OpenAI's two formats, usage.

Completions use the legacy `logprobs` object, parallel lists over the tokens shown:

    tokens          ["The", " cat", " sat"]            prompt tokens first when echo is set
    token_logprobs  [null, -2.1, -0.3]                 the first prompt token has none
    top_logprobs    [null, {" cat": -2.1, ...}, ...]   top-k (plus the token itself)
    text_offset     [0, 3, 7]                          character offset in prompt + completion

Chat uses `logprobs.content`: one {token, logprob, bytes, top_logprobs} per output token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from kvserve.outputs import CompletionOutput, Logprob, RequestOutput

# One position's logprobs as the engine gives them (None: the first prompt token).
Entry = dict[int, Logprob] | None


def now() -> int:
    return int(time.time())


def usage(outputs: Sequence[RequestOutput]) -> dict[str, Any]:
    """Token counts summed over the prompts of one request (each prompt counted once)."""
    num_prompt = sum(len(o.prompt_token_ids) for o in outputs)
    num_completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
        "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)},
    }


def best_of(outputs: list[CompletionOutput], n: int) -> list[CompletionOutput]:
    """The n samples with the highest cumulative logprob, re-indexed 0..n-1 (best first)."""
    if len(outputs) == n:
        return outputs
    ranked = sorted(outputs, key=lambda c: c.cumulative_logprob or float("-inf"), reverse=True)
    return [_reindexed(c, index) for index, c in enumerate(ranked[:n])]


def _reindexed(output: CompletionOutput, index: int) -> CompletionOutput:
    return CompletionOutput(
        index=index,
        text=output.text,
        token_ids=output.token_ids,
        cumulative_logprob=output.cumulative_logprob,
        logprobs=output.logprobs,
        finish_reason=output.finish_reason,
        stop_reason=output.stop_reason,
    )


def token_text(tokenizer: Any, token_id: int, entry: Entry = None) -> str:
    """A token's text: the engine's decoding when it has one, else the tokenizer's."""
    if entry is not None and token_id in entry and entry[token_id].decoded_token is not None:
        return str(entry[token_id].decoded_token)
    if tokenizer is None:
        return f"token_id:{token_id}"
    return str(tokenizer.decode([token_id]))


def legacy_logprobs(
    tokenizer: Any, token_ids: Sequence[int], entries: Sequence[Entry], text_offset: int
) -> dict[str, Any]:
    """The completions `logprobs` object over `token_ids`, offsets starting at `text_offset`."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        text = token_text(tokenizer, token_id, entry)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(entry[token_id].logprob if token_id in entry else None)
        top: dict[str, float] = {}
        for candidate, logprob in sorted(entry.items(), key=lambda item: item[1].rank):
            top.setdefault(token_text(tokenizer, candidate, entry), logprob.logprob)
        top_logprobs.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def chat_logprobs(
    tokenizer: Any, token_ids: Sequence[int], entries: Sequence[Entry], k: int
) -> dict[str, Any]:
    """The chat `logprobs` object: each token with its `top_logprobs` (k best, best first)."""
    content = []
    for token_id, entry in zip(token_ids, entries[: len(token_ids)], strict=True):
        assert entry is not None, "output tokens always have logprobs when asked"
        ranked = sorted(entry.items(), key=lambda item: item[1].rank)[:k]
        content.append({
            **_chat_token(tokenizer, token_id, entry, entry[token_id].logprob),
            "top_logprobs": [_chat_token(tokenizer, t, entry, lp.logprob) for t, lp in ranked],
        })  # fmt: skip
    return {"content": content}


def _chat_token(tokenizer: Any, token_id: int, entry: Entry, logprob: float) -> dict[str, Any]:
    text = token_text(tokenizer, token_id, entry)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}


def prompt_logprobs_json(tokenizer: Any, output: RequestOutput) -> list[Any] | None:
    """vLLM's `prompt_logprobs` field: per prompt token None or {token id: {logprob, ...}}."""
    if output.prompt_logprobs is None:
        return None
    return [
        None
        if entry is None
        else {
            str(token_id): {
                "logprob": lp.logprob,
                "rank": lp.rank,
                "decoded_token": token_text(tokenizer, token_id, entry),
            }
            for token_id, lp in entry.items()
        }
        for entry in output.prompt_logprobs
    ]


def prompt_text(tokenizer: Any, output: RequestOutput) -> str:
    """The prompt as text for `echo`: as sent, or decoded from its token ids."""
    if output.prompt is not None:
        return output.prompt
    if tokenizer is None:
        return ""
    return str(tokenizer.decode(output.prompt_token_ids))
