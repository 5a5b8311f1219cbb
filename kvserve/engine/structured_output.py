"""Structured output: one grammar matcher per request, enforced as a token mask (llguidance).

    StructuredOutputParams --compile_grammar--> grammar text (llguidance's format)
    Engine.validate        check(): grammar checked against the tokenizer, ValueError naming
                           the field before any work
    Engine.add_request     add_requests(): one LLMatcher per request; the samples of n > 1 fork
                           before their first output token, so they all start from the empty
                           output (copies of one fresh matcher)
    Scheduler.schedule     grammar_bitmask(): one mask row per constrained request that samples
    Sampler                apply_token_bitmask(): forbidden tokens -> -inf before choosing
    Scheduler.update_from_output
                           accept_token(): the matcher consumes the sampled token; a complete
                           grammar stops the request, a matcher error aborts it (logged)
    Scheduler._finish      free(): every exit path of a request drops its matcher

A finished grammar allows only the engine's EOS ids. Preemption by recompute keeps the output
tokens, so a matcher stays valid across it. The llguidance tokenizer (token id -> bytes, ~0.3 s
for a 49k vocabulary) is built once, on the first constrained request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np

from kvserve.engine.scheduler_output import GrammarBitmask, ScheduledRequest
from kvserve.request import Request, RequestStatus
from kvserve.sampling_params import StructuredOutputParams

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

logger = logging.getLogger("kvserve")

# Compact JSON (no free whitespace between tokens): small models cannot loop on blanks.
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}


def compile_grammar(params: StructuredOutputParams) -> str:
    """The llguidance grammar (JSON text) of one constraint; not validated yet (see `check`).

    json_object is the schema {"type": "object"}; choice is a Lark grammar whose start rule is
    one of the strings, each a quoted literal.
    """
    if params.json is not None:
        return llguidance.LLMatcher.grammar_from_json_schema(params.json, defaults=_JSON_OPTIONS)
    if params.json_object:
        return llguidance.LLMatcher.grammar_from_json_schema(
            {"type": "object"}, defaults=_JSON_OPTIONS
        )
    if params.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if params.choice is not None:
        lark = "start: " + " | ".join(json.dumps(choice) for choice in params.choice)
        return llguidance.LLMatcher.grammar_from_lark(lark)
    assert params.grammar is not None, "StructuredOutputParams sets exactly one kind"
    return llguidance.LLMatcher.grammar_from_lark(params.grammar)


class StructuredOutputManager:
    """The matchers of the running constrained requests, and the tokenizer they share.

    Args:
        tokenizer: the engine's HF tokenizer (a fast one), None for a model without one.
        eos_token_ids: the engine's EOS ids; the grammar ends on any of them.
        vocab_size: the model's vocabulary (the mask covers at least this many tokens).
    """

    def __init__(
        self,
        tokenizer: Any | None = None,
        eos_token_ids: Iterable[int] = (),
        vocab_size: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = sorted(eos_token_ids)
        self.vocab_size = vocab_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._matchers: dict[str, llguidance.LLMatcher] = {}

    @property
    def num_requests(self) -> int:
        return len(self._matchers)

    def check(self, params: StructuredOutputParams) -> None:
        """Compile and validate a constraint against this model's tokenizer.

        Raises:
            ValueError: "structured_output.<kind>: ..." for a bad schema, regex or grammar;
                "structured_output: ..." when the model has no (fast) tokenizer.
        """
        tokenizer = self._get_ll_tokenizer()
        grammar = compile_grammar(params)
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise ValueError(f"structured_output.{params.kind}: {error.strip()}")

    def add_requests(self, requests: list[Request]) -> None:
        """Give each constrained request a fresh matcher (all of them share one constraint).

        Raises:
            ValueError: the grammar fails to build (`check`, run by `Engine.validate`, catches
                this first).
        """
        params = requests[0].sampling_params.structured_output
        if params is None:
            return
        grammar = compile_grammar(params)
        matcher = llguidance.LLMatcher(self._get_ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_output.{params.kind}: {matcher.get_error()}")
        for index, request in enumerate(requests):
            self._matchers[request.request_id] = matcher if index == 0 else matcher.deep_copy()

    def grammar_bitmask(self, scheduled: list[ScheduledRequest]) -> GrammarBitmask | None:
        """The allowed next tokens of every constrained request that samples this step.

        A matcher in an error state allows only EOS; `accept_token` then aborts its request.
        """
        if not self._matchers:
            return None
        matchers = self._matchers
        request_ids = [r.request_id for r in scheduled if r.sample and r.request_id in matchers]
        if not request_ids:
            return None
        num_words = self._bitmask_width()
        bitmask = np.zeros((len(request_ids), num_words), dtype=np.int32)  # (n, num_words)
        for row, request_id in enumerate(request_ids):
            llguidance.numpy.fill_next_token_bitmask(self._matchers[request_id], bitmask, row)
        return GrammarBitmask(request_ids, bitmask)

    def accept_token(self, request_id: str, token_id: int) -> RequestStatus | None:
        """Advance a request's matcher by its sampled token.

        Returns:
            None to go on (also for an unconstrained request); FINISHED_STOPPED when the
            grammar is complete (nothing but EOS could follow); FINISHED_ABORTED when the
            matcher rejects the token or is in an error state (logged, never raised).
        """
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return None
        if not matcher.consume_token(token_id):
            logger.warning(
                "structured_output: request %s aborted, its grammar matcher failed: %s",
                request_id,
                matcher.get_error().splitlines()[0] if matcher.get_error() else "unknown error",
            )
            return RequestStatus.FINISHED_ABORTED
        if matcher.is_stopped():
            return RequestStatus.FINISHED_STOPPED
        return None

    def free(self, request_id: str) -> None:
        """Drop a finished request's matcher (nothing happens for an unconstrained one)."""
        self._matchers.pop(request_id, None)

    def check_invariants(self, live_request_ids: set[str]) -> None:
        """Only requests the scheduler still holds have a matcher."""
        stale = set(self._matchers) - live_request_ids
        if stale:
            raise AssertionError(f"grammar matchers of finished requests: {sorted(stale)}")

    def _get_ll_tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            self._ll_tokenizer = self._build_ll_tokenizer()
        return self._ll_tokenizer

    def _build_ll_tokenizer(self) -> llguidance.LLTokenizer:
        if self.tokenizer is None:
            raise ValueError(
                "structured_output: this model has no tokenizer (it runs on token ids only); "
                "a grammar needs the text of every token"
            )
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("structured_output: needs a fast (Rust) tokenizer")
        # The mask covers the model's whole vocabulary even where it pads past the tokenizer.
        tokenizer_size = max(self.tokenizer.get_vocab().values()) + 1
        return llguidance.hf.from_tokenizer(
            self.tokenizer,
            n_vocab=max(self.vocab_size, tokenizer_size),
            eos_token=self.eos_token_ids,
        )

    def _bitmask_width(self) -> int:
        assert self._ll_tokenizer is not None, "built by check() before any matcher"
        return (self._ll_tokenizer.vocab_size + 31) // 32
