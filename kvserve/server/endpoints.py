"""What differs between /v1/completions and /v1/chat/completions: how a choice is shown.

Both routes run one generation path (serving.py) and one stream loop (streaming.py); an
endpoint only formats:

    whole reply   choice(index, final, c)          {"text": ...} or {"message": ...}
    streamed      delta(index, output, c, before)  the part of the choice not sent yet

Choice `index` is `prompt_index * n + c.index`, as OpenAI numbers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from kvserve.outputs import CompletionOutput, RequestOutput
from kvserve.server import responses


class Sent(NamedTuple):
    """What a stream has sent of one choice (the next text offset for legacy logprobs)."""

    num_tokens: int
    num_chars: int
    finish_reason: str | None
    text_offset: int


def unchanged(before: Sent | None, c: CompletionOutput) -> bool:
    """The choice has no new token and no new finish reason since `before` was sent."""
    return before is not None and (before.num_tokens, before.finish_reason) == (
        len(c.token_ids),
        c.finish_reason,
    )


@dataclass(frozen=True)
class CompletionEndpoint:
    """/v1/completions: text and legacy logprobs (from the request body)."""

    OBJECT: ClassVar[str] = "text_completion"
    CHUNK_OBJECT: ClassVar[str] = "text_completion"

    tokenizer: Any
    n: int
    echo: bool  # the prompt's text (and logprobs) before each choice's
    echo_only: bool  # max_tokens 0: the one token generated is not shown
    logprobs: int | None
    prompt_logprobs: bool  # vLLM's `prompt_logprobs` list on each choice

    def shown(self, output: RequestOutput) -> RequestOutput:
        """The output as the client sees it (without the generated token when echo_only)."""
        if not self.echo_only:
            return output
        hidden = [
            CompletionOutput(c.index, "", [], 0.0, [], c.finish_reason and "length")
            for c in output.outputs
        ]
        return RequestOutput(
            output.request_id, output.prompt, output.prompt_token_ids, hidden, output.finished,
            output.num_cached_tokens, output.metrics, output.prompt_logprobs,
            num_cached_tokens_by_tier=output.num_cached_tokens_by_tier,
        )  # fmt: skip

    def choice(self, index: int, final: RequestOutput, c: CompletionOutput) -> dict[str, Any]:
        """One whole choice of the reply."""
        choice = self.delta(index, final, c, None)[0]
        if self.prompt_logprobs:
            choice["prompt_logprobs"] = responses.prompt_logprobs_json(self.tokenizer, final)
        return choice

    def delta(
        self, index: int, output: RequestOutput, c: CompletionOutput, before: Sent | None
    ) -> tuple[dict[str, Any], Sent]:
        """The choice's part not sent yet (all of it, prompt included when echoing, if
        `before` is None), and what will have been sent after it.

        Text offsets count from the start of prompt + completion, as OpenAI's legacy API does.
        """
        first, prompt = before is None, ""
        if before is None:
            if self.echo or self.logprobs is not None:
                prompt = responses.prompt_text(self.tokenizer, output)
            before = Sent(0, 0, None, 0 if self.echo else len(prompt))
        token_ids: list[int] = list(c.token_ids[before.num_tokens :])
        # the engine may have appended to its logprobs list since this output was made
        entries: list[responses.Entry] = list(
            (c.logprobs or [])[before.num_tokens : len(c.token_ids)]
        )
        text = c.text[before.num_chars :]
        if first and self.echo:
            text = prompt + text
            token_ids = list(output.prompt_token_ids) + token_ids
            entries = (output.prompt_logprobs or [None] * len(output.prompt_token_ids)) + entries
        choice: dict[str, Any] = {"index": index, "text": text, "logprobs": None}
        choice |= {"finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        offset = before.text_offset
        if self.logprobs is not None:
            choice["logprobs"] = logprobs = responses.legacy_logprobs(
                self.tokenizer, token_ids, entries, offset
            )
            offset += sum(len(token) for token in logprobs["tokens"])
        return choice, Sent(len(c.token_ids), len(c.text), c.finish_reason, offset)


@dataclass(frozen=True)
class ChatEndpoint:
    """/v1/chat/completions: an assistant message and `logprobs.content` (top `top`)."""

    OBJECT: ClassVar[str] = "chat.completion"
    CHUNK_OBJECT: ClassVar[str] = "chat.completion.chunk"

    tokenizer: Any
    n: int
    top: int | None
    echo: ClassVar[bool] = False

    def shown(self, output: RequestOutput) -> RequestOutput:
        """The output as the client sees it: all of it."""
        return output

    def choice(self, index: int, final: RequestOutput, c: CompletionOutput) -> dict[str, Any]:
        """One whole choice of the reply."""
        return {
            "index": index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": self._logprobs(c, 0),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }

    def delta(
        self, index: int, output: RequestOutput, c: CompletionOutput, before: Sent | None
    ) -> tuple[dict[str, Any], Sent]:
        """The choice's new text (with the role first), and what will have been sent."""
        num_tokens, num_chars = (0, 0) if before is None else before[:2]
        delta: dict[str, Any] = {"content": c.text[num_chars:]}
        if before is None:
            delta = {"role": "assistant", **delta}
        choice = {"index": index, "delta": delta, "logprobs": self._logprobs(c, num_tokens)}
        choice["finish_reason"] = c.finish_reason
        return choice, Sent(len(c.token_ids), len(c.text), c.finish_reason, 0)

    def _logprobs(self, c: CompletionOutput, num_sent: int) -> dict[str, Any] | None:
        """The logprobs of the tokens after the first `num_sent`, when asked."""
        if self.top is None or c.logprobs is None:
            return None
        # the engine may have appended to its logprobs list since this output was made
        entries = c.logprobs[num_sent : len(c.token_ids)]
        return responses.chat_logprobs(self.tokenizer, c.token_ids[num_sent:], entries, self.top)


Endpoint = CompletionEndpoint | ChatEndpoint
