"""Sampling parameters of one request, validated at construction (vLLM spelling)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

# Most logprobs a request may ask for, per output token and per prompt token.
MAX_LOGPROBS = 20
# OpenAI's range for one logit bias.
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True)
class StructuredOutputParams:
    """A constraint on the output text, enforced as a token mask (vLLM's `guided_*` kinds).

    Exactly one field is set:
        json         a JSON schema (dict or JSON text); the output is one JSON value matching it
        json_object  any JSON object (OpenAI's `response_format: {"type": "json_object"}`)
        regex        the output matches this regular expression
        choice       the output is exactly one of these strings
        grammar      a Lark grammar (llguidance's dialect)
    """

    json: str | dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        kinds = [name for name in _STRUCTURED_KINDS if getattr(self, name) not in (None, False)]
        _check(
            len(kinds) == 1,
            "structured_output",
            f"set exactly one of {', '.join(_STRUCTURED_KINDS)}; got {kinds or 'none'}",
        )
        if self.json is not None:
            _check(isinstance(self.json, (str, dict)), "structured_output.json", "dict or str")
            if isinstance(self.json, str):
                try:
                    json.loads(self.json)
                except ValueError as error:
                    raise ValueError(f"structured_output.json: not valid JSON ({error})") from None
        _check(_is_bool(self.json_object), "structured_output.json_object", "must be a boolean")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None:
                _check(
                    isinstance(value, str) and bool(value), f"structured_output.{name}", "non-empty"
                )
        if self.choice is not None:
            _check(
                isinstance(self.choice, list)
                and bool(self.choice)
                and all(isinstance(c, str) and c for c in self.choice),
                "structured_output.choice",
                "must be a non-empty list of non-empty strings",
            )
            object.__setattr__(self, "choice", list(self.choice))

    @property
    def kind(self) -> str:
        """The one constraint set: json, json_object, regex, choice or grammar."""
        return next(n for n in _STRUCTURED_KINDS if getattr(self, n) not in (None, False))


_STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each output token and when to stop.

    temperature 0 means greedy. `logprobs=k` returns the top-k log-probabilities of the raw
    model output for every generated token (plus the sampled token's own); `prompt_logprobs=k`
    does the same for every prompt token but the first. `ignore_eos` only keeps generating past
    EOS; it never masks EOS out of sampling. `logit_bias` adds to the logits of token ids before
    sampling (OpenAI's field; logprobs still come from the raw logits). `structured_output`
    constrains the text (a JSON schema, a regex, ...).

    Numbers are strict: a bool is not an int, floats must be finite.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    structured_output: StructuredOutputParams | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", [self.stop])
        object.__setattr__(self, "stop", list(self.stop or []))
        object.__setattr__(self, "stop_token_ids", list(self.stop_token_ids or []))
        self._check_numbers()
        _check(
            all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"
        )
        _check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "must be non-negative integers",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check(
                    _is_int(value) and 0 <= value <= MAX_LOGPROBS,
                    name,
                    f"must be an integer in [0, {MAX_LOGPROBS}], got {value!r}",
                )
        if self.seed is not None:
            _check(_is_int(self.seed), "seed", f"must be an integer, got {self.seed!r}")
        _check(_is_bool(self.ignore_eos), "ignore_eos", "must be a boolean")
        _check(_is_bool(self.skip_special_tokens), "skip_special_tokens", "must be a boolean")
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _checked_logit_bias(self.logit_bias))
        if self.structured_output is not None:
            _check(
                isinstance(self.structured_output, StructuredOutputParams),
                "structured_output",
                "must be a StructuredOutputParams",
            )

    def _check_numbers(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n!r}")
        _check(
            _is_float(self.temperature) and self.temperature >= 0.0,
            "temperature",
            f"must be a finite number >= 0, got {self.temperature!r}",
        )
        _check(
            _is_float(self.top_p) and 0.0 < self.top_p <= 1.0,
            "top_p",
            f"must be in (0, 1], got {self.top_p!r}",
        )
        _check(
            _is_int(self.top_k) and self.top_k >= -1,
            "top_k",
            f"must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}",
        )
        _check(
            _is_float(self.min_p) and 0.0 <= self.min_p <= 1.0,
            "min_p",
            f"must be in [0, 1], got {self.min_p!r}",
        )
        if self.max_tokens is not None:
            _check(
                _is_int(self.max_tokens) and self.max_tokens >= 1,
                "max_tokens",
                f"must be a positive integer, got {self.max_tokens!r}",
            )
        _check(
            _is_int(self.min_tokens) and self.min_tokens >= 0,
            "min_tokens",
            f"must be a non-negative integer, got {self.min_tokens!r}",
        )
        if self.max_tokens is not None:
            _check(
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )
        _check(
            _is_float(self.repetition_penalty) and self.repetition_penalty > 0.0,
            "repetition_penalty",
            f"must be a finite number > 0, got {self.repetition_penalty!r}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(
                _is_float(value) and -2.0 <= value <= 2.0,
                name,
                f"must be in [-2, 2], got {value!r}",
            )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def replace(self, **changes: object) -> SamplingParams:
        """A validated copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def for_child(self, index: int) -> SamplingParams:
        """Parameters of the index-th of `n` samples, run as its own request.

        Each child gets n=1 and, when a seed is set, the derived seed `seed + index`, so a
        request with n=4 equals 4 separate requests with seeds seed, seed+1, ...
        """
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)


def _checked_logit_bias(bias: object) -> dict[int, float]:
    """Token id -> bias in [-100, 100]; keys may be ints or decimal strings (JSON keys)."""
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias: must be a dict of token id -> bias, got {bias!r}")
    checked: dict[int, float] = {}
    for key, value in bias.items():
        token_id = key
        if isinstance(key, str):
            _check(key.isascii() and key.isdigit(), "logit_bias", f"key {key!r} is not a token id")
            token_id = int(key)
        _check(_is_int(token_id) and token_id >= 0, "logit_bias", f"key {key!r} is not a token id")
        _check(
            _is_float(value) and -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS,
            "logit_bias",
            f"the bias of token {key} must be a number in [-100, 100], got {value!r}",
        )
        checked[int(token_id)] = float(value)
    return checked


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")
