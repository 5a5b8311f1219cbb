"""The two generation routes: a parsed request body in, an OpenAI response (or SSE stream) out.

    body --protocol--> SamplingParams, prompts, an Endpoint (endpoints.py: how choices look)
         --_generate: AsyncEngine.generate (one per prompt)--> outputs
         --> JSON (whole choices + usage), or --streaming.chunks--> SSE chunks

Both routes differ only up to the Endpoint; from there one path serves them. A request with
several prompts runs them concurrently; choice `i * n + j` is prompt i's j-th sample, as
OpenAI numbers them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.server import responses, streaming
from kvserve.server.admission import reservation_of
from kvserve.server.endpoints import ChatEndpoint, CompletionEndpoint, Endpoint
from kvserve.server.engine_client import EngineClient
from kvserve.server.errors import ModelNotFound
from kvserve.server.limits import ServerLimits
from kvserve.server.metrics import ServerMetrics
from kvserve.server.protocol import ChatCompletionRequest, CompletionRequest
from kvserve.server.slo_gate import SLOMiss
from kvserve.tokenizer import apply_chat_template


@dataclass
class Serving:
    """What the routes share: the engine, the served model's name, metrics and limits."""

    engine: EngineClient
    model_name: str
    metrics: ServerMetrics
    limits: ServerLimits = field(default_factory=ServerLimits)

    def __post_init__(self) -> None:
        chars = self.limits.max_prompt_chars
        if chars is None:  # derived: no prompt longer than this can fit the context
            chars = self.engine.max_model_len * longest_token_chars(self.engine.tokenizer)
        self.max_prompt_chars: int = chars

    def model_card(self) -> dict[str, Any]:
        """The served model as `/v1/models` lists it."""
        return {
            "id": self.model_name,
            "object": "model",
            "created": responses.now(),
            "owned_by": "kvserve",
            "max_model_len": self.engine.max_model_len,
        }

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        """POST /v1/completions."""
        check_model(body.model, self.model_name)
        params, n = body.completion_params(self.limits.max_n)
        prompts = body.prompts(self.limits.max_batch_prompts)
        self._check_chars("prompt", [p for p in prompts if isinstance(p, str)])
        _hold_seats(request, params.n * len(prompts), "best_of" if params.n > n else "n")
        endpoint = CompletionEndpoint(
            self.engine.tokenizer,
            n=n,
            echo=bool(body.echo),
            echo_only=bool(body.echo) and body.max_tokens == 0,
            logprobs=body.logprobs,
            prompt_logprobs=body.prompt_logprobs is not None,
        )
        inputs = [_prompt_input(p, body.cache_salt) for p in prompts]
        return await self._generate(request, body, "cmpl", inputs, params, endpoint)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Any:
        """POST /v1/chat/completions."""
        check_model(body.model, self.model_name)
        params = body.chat_params(self.limits.max_n)
        _hold_seats(request, params.n, "n")
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("messages: this model has no tokenizer; use /v1/completions")
        conversation = [m.as_template_message() for m in body.messages]
        self._check_chars("messages", [m["content"] for m in conversation])
        # Rendering the template and tokenizing take milliseconds: off the event loop.
        prompt_ids = await asyncio.to_thread(apply_chat_template, tokenizer, conversation)
        endpoint = ChatEndpoint(tokenizer, n=params.n, top=params.logprobs)
        inputs = [_prompt_input(prompt_ids, body.cache_salt)]
        return await self._generate(request, body, "chatcmpl", inputs, params, endpoint)

    async def _generate(
        self,
        request: Request,
        body: CompletionRequest | ChatCompletionRequest,
        id_prefix: str,
        inputs: list[dict[str, Any]],
        params: SamplingParams,
        endpoint: Endpoint,
    ) -> Any:
        """The one generation path: run every prompt, then stream the choices as they grow
        or wait for the last outputs (a 499 if the client hung up first); `endpoint` formats."""
        request_id = self.engine.new_request_id(id_prefix)
        runs = await self._start(request_id, inputs, params)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            head = self._head(request_id, endpoint.CHUNK_OBJECT)
            return streaming.sse(streaming.chunks(head, endpoint, runs, include_usage), request_id)
        finals = await _finish_or_hang_up(request, runs)
        if finals is None:
            return Response(status_code=499)  # nobody is listening
        finals = [endpoint.shown(final) for final in finals]
        choices = [
            endpoint.choice(i * endpoint.n + c.index, final, c)
            for i, final in enumerate(finals)
            for c in responses.best_of(final.outputs, endpoint.n)
        ]
        head = self._head(request_id, endpoint.OBJECT)
        return {**head, "choices": choices, "usage": responses.usage(finals)}

    async def _start(
        self, request_id: str, inputs: list[dict[str, Any]], params: SamplingParams
    ) -> list[streaming.Run]:
        """Queue every prompt at once (they share the engine's steps) and await each one's
        first output, so a validation error surfaces here, before any byte is sent; the
        prompts already queued are then aborted."""
        streams = [
            self.metrics.track(
                self.engine.generate(
                    request_id if len(inputs) == 1 else f"{request_id}-{index}", prompt, params
                )
            )
            for index, prompt in enumerate(inputs)
        ]
        firsts = await asyncio.gather(
            *(stream.__anext__() for stream in streams), return_exceptions=True
        )
        errors = [first for first in firsts if isinstance(first, BaseException)]
        if errors:
            for stream in streams:
                await stream.aclose()
            if isinstance(errors[0], SLOMiss):
                self.metrics.count_slo_rejection(errors[0].objective)
            raise errors[0]
        return [
            streaming.Run(first, stream)  # type: ignore[arg-type]
            for first, stream in zip(firsts, streams, strict=True)
        ]

    def _check_chars(self, field_name: str, texts: Sequence[str]) -> None:
        """Reject text too long to fit the context before tokenizing it (milliseconds)."""
        limit = self.max_prompt_chars
        num_chars = sum(len(text) for text in texts)
        if limit is not None and num_chars > limit:
            raise ValueError(
                f"{field_name}: {num_chars} characters cannot fit max_model_len "
                f"{self.engine.max_model_len} tokens (limit {limit}, --max-prompt-chars)"
            )

    def _head(self, request_id: str, kind: str) -> dict[str, Any]:
        """The fields every reply and chunk starts with."""
        return {
            "id": request_id,
            "object": kind,
            "created": responses.now(),
            "model": self.model_name,
        }


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise ModelNotFound(requested)


def longest_token_chars(tokenizer: Any) -> int:
    """Characters of the vocabulary's longest token: no token covers more prompt text, so a
    prompt longer than max_model_len times this cannot fit (16 without a tokenizer)."""
    if tokenizer is None:
        return 16
    return max((len(token) for token in tokenizer.get_vocab()), default=16)


def _hold_seats(request: Request, num_seqs: int, param: str) -> None:
    """Grow the seats admission reserved at arrival to the request's real sequences
    (400 if they could never fit, 429 if not now)."""
    reservation = reservation_of(request)
    if reservation is not None:
        reservation.grow(num_seqs, param)


def _prompt_input(prompt: str | list[int], cache_salt: str | None) -> dict[str, Any]:
    key = "prompt" if isinstance(prompt, str) else "prompt_token_ids"
    return {key: prompt, "cache_salt": cache_salt}


async def _finish_or_hang_up(
    request: Request, runs: list[streaming.Run]
) -> list[RequestOutput] | None:
    """Every run's final output, or None if the client hung up first (the requests are then
    aborted: cancelling the consumers closes the engine streams, which frees their blocks)."""
    task = asyncio.ensure_future(asyncio.gather(*(_last(run) for run in runs)))
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
    return list(task.result())


async def _last(run: streaming.Run) -> RequestOutput:
    last = run.first
    async for output in run.stream:
        last = output
    return last
