"""OpenAI request bodies (pydantic) and the JSON kvserve answers with.

Fields the `openai` client sends are accepted; unknown fields are ignored, as OpenAI does.
Values are checked by `SamplingParams` (one place for the rules), whose ValueError names the
field; the server turns it into a 400.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.sampling_params import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions the openai client can pass through `extra_body`
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            seed=self.seed,
            logprobs=logprobs,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (a list of one prompt is unwrapped).

        Raises:
            ValueError: several prompts in one request (send one request per prompt).
        """
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("prompt: send one prompt per request")
            return prompt[0]
        return prompt  # type: ignore[return-value]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are rejected."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"messages: content part {part.get('type')!r} is not supported")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def usage(output: RequestOutput) -> dict[str, Any]:
    num_prompt = len(output.prompt_token_ids)
    num_completion = sum(len(c.token_ids) for c in output.outputs)
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
        "prompt_tokens_details": {"cached_tokens": output.num_cached_tokens},
    }


def completion_logprobs(completion: CompletionOutput, tokenizer: Any) -> dict[str, Any] | None:
    """The legacy completions `logprobs` object: tokens, their logprobs, top alternatives."""
    if completion.logprobs is None:
        return None
    tokens, token_logprobs, top = [], [], []
    for token_id, entry in zip(completion.token_ids, completion.logprobs, strict=False):
        tokens.append(_token_text(tokenizer, token_id))
        token_logprobs.append(entry[token_id].logprob if token_id in entry else None)
        top.append({_token_text(tokenizer, t): lp.logprob for t, lp in entry.items()})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top}


def chat_logprobs(completion: CompletionOutput, tokenizer: Any, k: int) -> dict[str, Any] | None:
    """The chat `logprobs.content` list: each token with its `top_logprobs` (best first)."""
    if completion.logprobs is None:
        return None
    content = []
    for token_id, entry in zip(completion.token_ids, completion.logprobs, strict=False):
        ranked = sorted(entry.items(), key=lambda item: item[1].rank)[:k]
        content.append({
            "token": _token_text(tokenizer, token_id),
            "logprob": entry[token_id].logprob if token_id in entry else None,
            "top_logprobs": [
                {"token": _token_text(tokenizer, t), "logprob": lp.logprob} for t, lp in ranked
            ],
        })  # fmt: skip
    return {"content": content}


def _token_text(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return str(tokenizer.decode([token_id]))


def now() -> int:
    return int(time.time())
