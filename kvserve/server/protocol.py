"""OpenAI request bodies (pydantic, strict) and their translation into `SamplingParams`.

Types are OpenAI's and strict: a string or a bool is not a number, floats are finite, an
unknown field is a 400 (as OpenAI answers "Unrecognized request argument"). Fields OpenAI
defines but kvserve does not implement are declared so that setting them is a 400 naming the
field, never silently dropped. Accepted without effect: `user`, `store`, `metadata`,
`service_tier` and `parallel_tool_calls` (these change nothing about the tokens).
Value ranges are checked by `SamplingParams` (one place for the rules), whose ValueError names
the field; the server turns it into a 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvserve.sampling_params import SamplingParams, StructuredOutputParams


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaSpec(_Body):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class _SamplingFields(_Body):
    """Fields both routes share (OpenAI's, then vLLM's extensions sent via `extra_body`)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # accepted, no effect on the tokens
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    prompt_logprobs: int | None = None
    cache_salt: str | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def sampling_params(self, **fields: Any) -> SamplingParams:
        """The engine's parameters: this body's fields, then `fields` (route-specific)."""
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        values: dict[str, Any] = {
            name: getattr(self, name) for name in _SAMPLING_NAMES if getattr(self, name) is not None
        }
        if isinstance(self.stop, str):
            values["stop"] = [self.stop]
        values["structured_output"] = self.structured_output()
        values.update(fields)
        return SamplingParams(**values)

    def structured_output(self) -> StructuredOutputParams | None:
        """`response_format` or one `guided_*` field as an engine constraint (at most one)."""
        sources: dict[str, StructuredOutputParams] = {}
        form = self.response_format
        if form is not None and form.type == "json_object":
            sources["response_format"] = StructuredOutputParams(json_object=True)
        elif form is not None and form.type == "json_schema":
            if form.json_schema is None or form.json_schema.schema_ is None:
                raise ValueError("response_format.json_schema: needs a 'schema'")
            sources["response_format"] = StructuredOutputParams(json=form.json_schema.schema_)
        guided = {
            "guided_json": ("json", self.guided_json),
            "guided_regex": ("regex", self.guided_regex),
            "guided_choice": ("choice", self.guided_choice),
            "guided_grammar": ("grammar", self.guided_grammar),
        }
        for name, (kind, value) in guided.items():
            if value is not None:
                sources[name] = _structured(name, kind, value)
        if len(sources) > 1:
            raise ValueError(f"{list(sources)[1]}: set at most one of {', '.join(sources)}")
        return next(iter(sources.values()), None)

    @property
    def salt(self) -> str | None:
        return self.cache_salt


def _structured(name: str, kind: str, value: Any) -> StructuredOutputParams:
    try:
        return StructuredOutputParams(**{kind: value})
    except ValueError as error:  # name the request's field, not the engine's
        raise ValueError(f"{name}: {str(error).split(': ', 1)[-1]}") from None


# SamplingParams fields a body may set by the same name (None = the engine's default).
_SAMPLING_NAMES = (
    "temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
    "logit_bias", "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos",
    "stop_token_ids", "skip_special_tokens", "prompt_logprobs",
)  # fmt: skip


Prompt = str | list[int]


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self, max_batch_prompts: int) -> list[Prompt]:
        """The prompts of this request: one text or token-id list, or a list of them.

        Raises:
            ValueError: an empty prompt list, or more than `max_batch_prompts` prompts.
        """
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ValueError("prompt: must not be empty")
        if isinstance(prompt[0], int):
            return [prompt]
        if len(prompt) > max_batch_prompts:
            raise ValueError(
                f"prompt: {len(prompt)} prompts in one request exceed the limit of "
                f"{max_batch_prompts} (--max-batch-prompts)"
            )
        return list(prompt)

    def completion_params(self, max_n: int) -> tuple[SamplingParams, int]:
        """The engine's parameters and how many of its samples to return.

        `best_of` > n samples `best_of` sequences and returns the n most likely (by cumulative
        logprob). `max_tokens: 0` with `echo` scores the prompt only: one token is generated
        and dropped from the reply.
        """
        if self.suffix is not None:
            raise ValueError("suffix: not supported (kvserve has no fill-in-the-middle models)")
        n = 1 if self.n is None else self.n
        best_of = n if self.best_of is None else self.best_of
        _check_n("n", n, max_n)
        _check_n("best_of", best_of, max_n)
        if best_of < n:
            raise ValueError(f"best_of: must be >= n ({n}), got {best_of}")
        if best_of > n and self.stream:
            raise ValueError("best_of: cannot be used with stream (only the n best are known)")
        max_tokens = 16 if self.max_tokens is None else self.max_tokens
        if max_tokens < 0:
            raise ValueError(f"max_tokens: must be a non-negative integer, got {max_tokens}")
        if max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 generates nothing; use it with echo: true")
        logprobs = self.logprobs
        if best_of > n and logprobs is None:
            logprobs = 0  # the ranking needs each sample's cumulative logprob
        extra: dict[str, Any] = {"n": best_of, "max_tokens": max(max_tokens, 1)}
        extra["logprobs"] = logprobs
        if self.echo and self.logprobs is not None:
            extra["prompt_logprobs"] = max(self.logprobs, self.prompt_logprobs or 0)
        return self.sampling_params(**extra), n


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def as_template_message(self) -> dict[str, str]:
        """{"role", "content"} for the chat template (`developer` is OpenAI's new `system`)."""
        role = "system" if self.role == "developer" else self.role
        if self.content is None or isinstance(self.content, str):
            return {"role": role, "content": self.content or ""}
        return {"role": role, "content": "".join(part.text for part in self.content)}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    parallel_tool_calls: bool | None = None  # accepted: there are no tools to call
    # OpenAI fields kvserve does not implement: setting them is a 400 naming the field
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    reasoning_effort: str | None = None
    web_search_options: Any = None

    def chat_params(self, max_n: int) -> SamplingParams:
        """The engine's parameters (max_tokens None = what the context leaves)."""
        for name in _UNSUPPORTED_CHAT:
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: {_UNSUPPORTED_CHAT[name]}")
        if self.modalities not in (None, ["text"]):
            raise ValueError("modalities: only ['text'] is supported")
        if not self.messages:
            raise ValueError("messages: must contain at least one message")
        n = 1 if self.n is None else self.n
        _check_n("n", n, max_n)
        max_tokens = self.max_completion_tokens
        name = "max_completion_tokens"
        if max_tokens is None:
            max_tokens, name = self.max_tokens, "max_tokens"
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"{name}: must be a positive integer, got {max_tokens}")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens=max_tokens, logprobs=logprobs)


_UNSUPPORTED_CHAT = {
    "tools": "tool calling is not supported; use response_format json_schema",
    "tool_choice": "tool calling is not supported; use response_format json_schema",
    "functions": "function calling is not supported; use response_format json_schema",
    "function_call": "function calling is not supported; use response_format json_schema",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this model does not reason",
    "web_search_options": "web search is not supported",
}


def _check_n(name: str, value: int, max_n: int) -> None:
    if not 1 <= value <= max_n:
        raise ValueError(f"{name}: must be an integer in [1, {max_n}] (--max-n), got {value}")


def describe_validation_error(errors: list[Any]) -> tuple[str, str | None]:
    """(message, param) for pydantic's errors, with the field path as `messages[0].role`.

    Of a union's errors the deepest is the most telling (`stop[0]` is not a string); when
    every member failed at the union itself, the message lists the accepted types.
    """
    if not errors:
        return "invalid request body", None
    chosen = max(errors, key=lambda error: len(error.get("loc", ())))
    path, tags = "", []
    for part in chosen.get("loc", ()):
        if part == "body":
            continue  # FastAPI's root
        if isinstance(part, str) and _is_union_tag(part):
            tags.append(part)
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    reason = str(chosen.get("msg", "invalid value"))
    if chosen.get("type") == "extra_forbidden":
        reason = "unrecognized request argument"
    loc = chosen.get("loc", ())
    if tags and loc and loc[-1] == tags[-1]:  # failed at the union: list what it accepts
        members = [e["loc"][-1] for e in errors if tuple(e.get("loc", ()))[:-1] == loc[:-1]]
        reason = f"expected {' or '.join(dict.fromkeys(str(m) for m in members))}"
    return (f"{path}: {reason}" if path else reason), (path or None)


def _is_union_tag(part: str) -> bool:
    """pydantic names a union member by its type: 'str', 'list[int]', 'ContentPart', ..."""
    return "[" in part or part[:1].isupper() or part in {"str", "int", "float", "bool", "none"}
