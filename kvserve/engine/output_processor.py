"""Turns per-step engine state into user-facing `RequestOutput`s.

A user request with `n` samples runs as `n` child requests (see `SamplingParams.for_child`);
this module detokenizes each child incrementally, finds stop strings, collects logprobs, and
assembles the children back into one `RequestOutput` per user request.

Prompt logprobs belong to the user request: whichever child scores a prompt position first
supplies it (with n > 1 and shared blocks that is the parent, which prefills [0, P - 1)).
Each child delivers its positions in order from 0, so the list only ever grows at its end.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvserve.engine.continuation import ContinuedSample
from kvserve.engine.detokenizer import IncrementalDetokenizer
from kvserve.engine.scheduler_output import ModelRunnerOutput, PromptLogprobRows, TokenLogprobs
from kvserve.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
)
from kvserve.request import Request


@dataclass
class _ChildState:
    index: int
    detokenizer: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0
    stop_string: str | None = None
    output: CompletionOutput | None = None


@dataclass
class _ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: dict[str, _ChildState]
    metrics: RequestMetrics
    # [None, then one dict per scored prompt token] when the request asked for them
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0
    num_cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    finished_children: set[str] = field(default_factory=set)


class OutputProcessor:
    """Detokenization, stop strings and output assembly (no torch)."""

    def __init__(self, tokenizer: object | None) -> None:
        self.tokenizer = tokenizer
        self._parents: dict[str, _ParentState] = {}
        self._parent_of: dict[str, str] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        children: list[Request],
        continued: Sequence[ContinuedSample] | None = None,
    ) -> None:
        """Track a user request's samples; `continued` (one per child) carries the output
        each already has (engine/continuation.py): its text and logprobs start from it.

        Raises:
            ValueError: a continued sample's text already holds a stop string (nothing kept).
        """
        states: dict[str, _ChildState] = {}
        for index, child in enumerate(children):
            params = child.sampling_params
            state = _ChildState(
                index=index,
                detokenizer=IncrementalDetokenizer(self.tokenizer, child.prompt_token_ids, params),
                logprobs=[] if params.logprobs is not None else None,
            )
            if continued is not None:
                _continue(state, continued[index])
            states[child.request_id] = state
        for child in children:
            self._parent_of[child.request_id] = request_id
        self._parents[request_id] = _ParentState(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=children[0].prompt_token_ids,
            children=states,
            metrics=RequestMetrics(arrival_time=children[0].arrival_time),
            prompt_logprobs=None if children[0].sampling_params.prompt_logprobs is None else [None],
        )

    def child_ids(self, request_id: str) -> list[str]:
        parent = self._parents.get(request_id)
        return list(parent.children) if parent else []

    def has_request(self, request_id: str) -> bool:
        return request_id in self._parents

    def abort(self, request_id: str) -> None:
        """Forget a user request whose children the scheduler already finished."""
        parent = self._parents.get(request_id)
        if parent is not None:
            self._forget(parent)

    def detokenize(self, updated: list[Request], model_output: ModelRunnerOutput) -> list[str]:
        """Collect the step's prompt logprobs, then feed each child its new token.

        Returns the ids of children that hit a stop string.
        """
        for child_id, prompt_rows in model_output.prompt_logprobs.items():
            self._add_prompt_logprobs(child_id, prompt_rows)
        logprobs_of = dict(zip(model_output.request_ids, model_output.logprobs, strict=True))
        stopped: list[str] = []
        for request in updated:
            state = self._child(request.request_id)
            token_logprobs = logprobs_of.get(request.request_id)
            if token_logprobs is not None:
                self._add_logprobs(state, token_logprobs)
            if state.stop_string is None:
                state.stop_string = state.detokenizer.update(request.output_token_ids[-1:])
                if state.stop_string is not None:
                    request.stop_reason = state.stop_string
                    stopped.append(request.request_id)
        return stopped

    def make_outputs(self, requests: list[Request]) -> list[RequestOutput]:
        """One cumulative `RequestOutput` per user request touched this step."""
        touched: dict[str, _ParentState] = {}
        for request in requests:
            parent = self._parents[self._parent_of[request.request_id]]
            self._update_child(parent, request)
            touched[parent.request_id] = parent
        return [self._assemble(parent) for parent in touched.values()]

    def _update_child(self, parent: _ParentState, request: Request) -> None:
        state = parent.children[request.request_id]
        finish_reason = request.status.finish_reason
        if state.stop_string is not None:
            finish_reason = "stop"
        state.output = CompletionOutput(
            index=state.index,
            text=state.detokenizer.output_text,
            token_ids=list(request.output_token_ids),
            cumulative_logprob=state.cumulative_logprob if state.logprobs is not None else None,
            logprobs=state.logprobs,
            finish_reason=finish_reason,
            stop_reason=request.stop_reason,
        )
        if request.num_cached_tokens > parent.num_cached_tokens:  # the sample that hit most
            parent.num_cached_tokens = request.num_cached_tokens
            parent.num_cached_tokens_by_tier = dict(request.num_cached_tokens_by_tier)
        if parent.metrics.first_token_time is None:
            parent.metrics.first_token_time = request.first_token_time
            parent.metrics.first_scheduled_time = request.first_scheduled_time
        if finish_reason is not None:
            parent.finished_children.add(request.request_id)

    def _assemble(self, parent: _ParentState) -> RequestOutput:
        finished = len(parent.finished_children) == len(parent.children)
        outputs = [
            child.output or CompletionOutput(index=child.index, text="", token_ids=[])
            for child in parent.children.values()
        ]
        if finished:
            parent.metrics.finished_time = time.monotonic()
            self._forget(parent)
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=parent.num_cached_tokens,
            num_cached_tokens_by_tier=parent.num_cached_tokens_by_tier,
            metrics=parent.metrics,
            prompt_logprobs=parent.prompt_logprobs,
        )

    def _forget(self, parent: _ParentState) -> None:
        del self._parents[parent.request_id]
        for child_id in parent.children:
            del self._parent_of[child_id]

    def _child(self, child_id: str) -> _ChildState:
        return self._parents[self._parent_of[child_id]].children[child_id]

    def _add_logprobs(self, state: _ChildState, token: TokenLogprobs) -> None:
        assert state.logprobs is not None
        state.logprobs.append(self._logprob_entry(token))
        state.cumulative_logprob += token.logprob

    def _add_prompt_logprobs(self, child_id: str, prompt_rows: PromptLogprobRows) -> None:
        """Append the rows past what the request has; earlier ones another child gave.

        have:   [ None | 1 ......... len-1 ]
        rows:          start+1 ............... start+len(rows)   (start + 1 <= len)
        """
        have = self._parents[self._parent_of[child_id]].prompt_logprobs
        if have is None:
            return
        if prompt_rows.start > len(have) - 1:
            raise AssertionError(f"{child_id}: prompt logprobs from {prompt_rows.start} skip rows")
        new_rows = prompt_rows.rows[len(have) - 1 - prompt_rows.start :]
        have.extend(self._logprob_entry(row) for row in new_rows)

    def _logprob_entry(self, token: TokenLogprobs) -> dict[int, Logprob]:
        """Candidate token id -> Logprob: the top-k (ranks 1..k) plus the token itself."""
        entry = {
            token_id: Logprob(logprob, rank, self._decode(token_id))
            for rank, (token_id, logprob) in enumerate(
                zip(token.top_token_ids, token.top_logprobs, strict=True), start=1
            )
        }
        if token.token_id not in entry:
            entry[token.token_id] = Logprob(token.logprob, token.rank, self._decode(token.token_id))
        return entry

    def _decode(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        return str(self.tokenizer.decode([token_id]))  # type: ignore[attr-defined]


def _continue(state: _ChildState, sample: ContinuedSample) -> None:
    """Start a child's output from a continued sample's tokens, text and logprobs."""
    state.index = sample.index
    if state.detokenizer.update(sample.token_ids) is not None:
        raise ValueError(
            f"continue_from: sample {sample.index}'s tokens already hold a stop string; "
            "it cannot be continued"
        )
    if state.logprobs is not None and sample.logprobs is not None:
        state.logprobs.extend(sample.logprobs)
        state.cumulative_logprob = sample.cumulative_logprob
