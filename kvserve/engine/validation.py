"""A request checked against the model and the engine's limits before any work (ValueError
naming the field); `Engine.validate` adds the structured-output check."""

from __future__ import annotations

from kvserve.sampling_params import SamplingParams


def validate_request(
    prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int
) -> SamplingParams:
    """`params` with `max_tokens` resolved (what fits after the prompt when unset).

    Raises:
        ValueError: an empty prompt, a token id or logit_bias key outside the vocabulary, or
            a prompt (plus max_tokens) that does not fit max_model_len.
    """
    if not prompt_token_ids:
        raise ValueError("prompt_token_ids: the prompt must contain at least one token")
    for token_id in prompt_token_ids:
        if not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise ValueError(
                f"prompt_token_ids: token id {token_id!r} is outside the vocabulary "
                f"[0, {vocab_size})"
            )
    outside = [t for t in params.logit_bias or {} if t >= vocab_size]
    if outside:
        raise ValueError(
            f"logit_bias: token id {outside[0]} is outside the vocabulary [0, {vocab_size})"
        )
    num_prompt = len(prompt_token_ids)
    if num_prompt >= max_model_len:
        raise ValueError(
            f"prompt: {num_prompt} tokens leave no room to generate within "
            f"max_model_len {max_model_len}"
        )
    if params.max_tokens is None:
        return params.replace(max_tokens=max_model_len - num_prompt)
    if num_prompt + params.max_tokens > max_model_len:
        raise ValueError(
            f"max_tokens: prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) "
            f"= {num_prompt + params.max_tokens} exceeds max_model_len {max_model_len}"
        )
    return params
