"""Outputs between a replica and the ingress as deltas: what changed since the last one sent.

An engine's `RequestOutput` is cumulative: every step repeats the prompt's token ids and each
sample's tokens, text and logprobs so far. Sent whole every step that is O(length) bytes a
request a step, pickled in the replica and unpickled in the ingress. The replica packs
instead (`Packer`): the prompt once, then each sample's new tokens, text and logprobs; the
ingress unpacks (`Unpacker`) back to the cumulative output the server expects.

    replica: Packer.pack(output) -> OutputDelta --(one message a step)--> ingress:
             Unpacker.unpack(delta) -> RequestOutput (equal to `output`)

A field that did not only grow (text a stop string cut back, say) is sent whole: the
`*_start` offsets say where the new part goes (0: replace).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kvserve.outputs import (
    CompletionOutput,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
    SampleLogprobs,
)


@dataclasses.dataclass
class SampleDelta:
    """One sample's change: `token_ids` go at `token_start`, `text` at `text_start`,
    `logprobs` at `logprob_start` (None: the sample has no logprobs)."""

    index: int
    token_start: int
    token_ids: list[int]
    text_start: int
    text: str
    logprob_start: int
    logprobs: SampleLogprobs | None
    cumulative_logprob: float | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclasses.dataclass
class Prompt:
    """The prompt side of a request, sent first and again only when it changes."""

    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None


@dataclasses.dataclass
class OutputDelta:
    request_id: str
    prompt: Prompt | None  # None: as last sent
    samples: list[SampleDelta]
    finished: bool
    num_cached_tokens: int
    num_cached_tokens_by_tier: dict[str, int]
    metrics: RequestMetrics | None
    kv_block_ids: list[list[int]]


def _grown(sent: Any, new: Any) -> int:
    """How much of `new` the receiver has already: `len(sent)` when `new` extends it (same
    length-1 element, the lists only append), else 0."""
    size = len(sent)
    if size == 0 or len(new) < size:
        return 0
    if isinstance(new, str):
        return size if new.startswith(sent) else 0
    return size if new[size - 1] == sent[-1] else 0


class _SampleSent:
    """What the receiver has of one sample."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: SampleLogprobs = []


class Packer:
    """The replica's side for one request: what it sent so far."""

    def __init__(self) -> None:
        self._prompt_key: tuple[int, int] | None = None
        self._samples: dict[int, _SampleSent] = {}

    def pack(self, output: RequestOutput) -> OutputDelta:
        prompt = None
        key = (len(output.prompt_token_ids), len(output.prompt_logprobs or ()))
        if key != self._prompt_key:
            self._prompt_key = key
            prompt_logprobs = output.prompt_logprobs
            prompt = Prompt(
                output.prompt,
                list(output.prompt_token_ids),
                list(prompt_logprobs) if prompt_logprobs is not None else None,
            )
        return OutputDelta(
            request_id=output.request_id,
            prompt=prompt,
            samples=[self._pack_sample(sample) for sample in output.outputs],
            finished=output.finished,
            num_cached_tokens=output.num_cached_tokens,
            num_cached_tokens_by_tier=dict(output.num_cached_tokens_by_tier),
            metrics=output.metrics,
            kv_block_ids=output.kv_block_ids,
        )

    def _pack_sample(self, sample: CompletionOutput) -> SampleDelta:
        sent = self._samples.setdefault(sample.index, _SampleSent())
        token_start = _grown(sent.token_ids, sample.token_ids)
        text_start = _grown(sent.text, sample.text)
        logprobs = sample.logprobs
        logprob_start = _grown(sent.logprobs, logprobs) if logprobs is not None else 0
        delta = SampleDelta(
            index=sample.index,
            token_start=token_start,
            token_ids=sample.token_ids[token_start:],
            text_start=text_start,
            text=sample.text[text_start:],
            logprob_start=logprob_start,
            logprobs=logprobs[logprob_start:] if logprobs is not None else None,
            cumulative_logprob=sample.cumulative_logprob,
            finish_reason=sample.finish_reason,
            stop_reason=sample.stop_reason,
        )
        sent.token_ids = list(sample.token_ids)  # copies: the engine appends to its lists
        sent.text = sample.text
        sent.logprobs = list(logprobs) if logprobs is not None else []
        return delta


class Unpacker:
    """The ingress's side for one request: the cumulative output so far."""

    def __init__(self) -> None:
        self._prompt: Prompt | None = None
        self._samples: dict[int, CompletionOutput] = {}

    def unpack(self, delta: OutputDelta) -> RequestOutput:
        if delta.prompt is not None:
            self._prompt = delta.prompt
        assert self._prompt is not None, "the first delta carries the prompt"
        outputs = [self._unpack_sample(sample) for sample in delta.samples]
        return RequestOutput(
            request_id=delta.request_id,
            prompt=self._prompt.prompt,
            prompt_token_ids=self._prompt.prompt_token_ids,
            outputs=outputs,
            finished=delta.finished,
            num_cached_tokens=delta.num_cached_tokens,
            metrics=delta.metrics,
            prompt_logprobs=self._prompt.prompt_logprobs,
            kv_block_ids=delta.kv_block_ids,
            num_cached_tokens_by_tier=delta.num_cached_tokens_by_tier,
        )

    def _unpack_sample(self, delta: SampleDelta) -> CompletionOutput:
        last = self._samples.get(delta.index) or CompletionOutput(delta.index, "", [])
        logprobs = None
        if delta.logprobs is not None:
            logprobs = (last.logprobs or [])[: delta.logprob_start] + delta.logprobs
        sample = CompletionOutput(
            index=delta.index,
            text=last.text[: delta.text_start] + delta.text,
            token_ids=last.token_ids[: delta.token_start] + delta.token_ids,
            cumulative_logprob=delta.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=delta.finish_reason,
            stop_reason=delta.stop_reason,
        )
        self._samples[delta.index] = sample
        return sample
