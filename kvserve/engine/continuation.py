"""A request continued from tokens another engine generated: prefill/decode disaggregation.

    prefill engine:  prompt -> K/V of the prompt, first token t0 (sampled there, with its
                     logprobs)                                   -> the K/V move to ...
    decode engine:   add_request(prompt, params, continue_from=[ContinuedSample(0, [t0], ...)])
                     -> the prompt's blocks hit the prefix cache (moved in), the rest of the
                        prompt and t0 are computed, sampling resumes at output position 1

A continued sample is a request whose first output tokens are already there, like one
preempted and recomputed: the scheduler computes every token it lacks K/V for, then samples.
What depends on the output so far carries over: seeded sampling (a sample's noise is keyed by
its seed and output position, engine/sampler.py), penalties, min/max tokens, the grammar of
structured output (advanced by the carried tokens), the text and its stop strings, the
logprobs. With n > 1, each sample keeps its index, so its derived seed is the one it had.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvserve.engine.structured_output import StructuredOutputManager
from kvserve.outputs import Logprob
from kvserve.request import Request
from kvserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class ContinuedSample:
    """One sample of a user request, with the output tokens it has so far."""

    index: int  # its index among the request's n samples (its seed derives from it)
    token_ids: list[int]  # its output tokens so far, at least one
    logprobs: list[dict[int, Logprob]] | None = None  # one entry per token, if asked for
    cumulative_logprob: float = 0.0


def check_continuation(
    samples: Sequence[ContinuedSample],
    params: SamplingParams,
    vocab_size: int,
    eos_token_ids: frozenset[int],
) -> None:
    """Raises ValueError naming `continue_from` when the samples cannot continue `params`
    (`max_tokens` resolved): bad indices or counts, or tokens that already ended a sample
    (EOS unless `ignore_eos`, a stop token id)."""
    if not samples:
        raise ValueError("continue_from: give at least one sample to continue")
    indices = [sample.index for sample in samples]
    if len(set(indices)) != len(indices) or not all(0 <= i < params.n for i in indices):
        raise ValueError(f"continue_from: sample indices must be distinct, in [0, {params.n})")
    assert params.max_tokens is not None
    for sample in samples:
        if not sample.token_ids or len(sample.token_ids) >= params.max_tokens:
            raise ValueError(
                f"continue_from: sample {sample.index} has {len(sample.token_ids)} tokens; "
                f"a continued sample has 1 to max_tokens - 1 ({params.max_tokens - 1})"
            )
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in sample.token_ids):
            raise ValueError(
                f"continue_from: sample {sample.index} has a token outside [0, {vocab_size})"
            )
        enders = set(params.stop_token_ids or ()) | (
            set() if params.ignore_eos else set(eos_token_ids)
        )
        if enders.intersection(sample.token_ids):
            raise ValueError(
                f"continue_from: sample {sample.index} already ended (EOS or a stop token id); "
                "it cannot be continued"
            )
        expected = None if params.logprobs is None else len(sample.token_ids)
        got = None if sample.logprobs is None else len(sample.logprobs)
        if got != expected:
            raise ValueError(
                f"continue_from: sample {sample.index} needs {expected} logprob entries "
                f"(logprobs={params.logprobs}), got {got}"
            )


def continue_children(
    children: Sequence[Request],
    samples: Sequence[ContinuedSample],
    structured_output: StructuredOutputManager,
) -> None:
    """Give each child its sample's tokens, and advance its grammar (if any) past them.

    Raises:
        ValueError: the grammar rejects or ends at a carried token (the engine that made it
            would have finished the sample there); no matcher is left behind.
    """
    for child, sample in zip(children, samples, strict=True):
        for token_id in sample.token_ids:
            child.append_output_token(token_id)
            if structured_output.accept_token(child.request_id, token_id) is not None:
                for each in children:
                    structured_output.free(each.request_id)
                raise ValueError(
                    f"continue_from: sample {sample.index}'s token {token_id} ends or breaks "
                    "its structured output; it cannot be continued"
                )
