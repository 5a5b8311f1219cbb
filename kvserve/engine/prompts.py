"""What a prompt may be, and its tokenization: the one place that reads a dict prompt's keys.

A prompt is text, a list of token ids, or a dict:

    {"prompt": "text"}                      tokenized here
    {"prompt_token_ids": [1, 2, 3]}         used as given ("prompt" may add its text)
    either + {"cache_salt": "tenant-a"}     only prompts with the same salt share KV blocks

Every entry point (`LLM.generate`, `LLM.generate_stream`, the server's `AsyncEngine`) hands
the prompt, or the `TokenizedPrompt` made from it, to `Engine.add_request`, so none of them
can drop the salt.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from kvserve.tokenizer import check_text

PromptInput = str | list[int] | dict[str, Any]


class TokenizedPrompt(NamedTuple):
    """A prompt after tokenization: its text (None when given as ids), ids and cache salt."""

    text: str | None
    prompt_token_ids: list[int]
    cache_salt: str | None = None


def tokenize_prompt(
    tokenizer: Any | None, prompt: PromptInput | TokenizedPrompt
) -> TokenizedPrompt:
    """Tokenize a prompt (a `TokenizedPrompt` is returned as is, its salt checked).

    Args:
        tokenizer: the model's tokenizer, or None (then only token ids are accepted).
        prompt: text, token ids, a dict as in the module docstring, or a TokenizedPrompt.
    Returns:
        The text, the token ids (not yet checked against the vocabulary) and the salt.
    Raises:
        ValueError: naming the field (`prompt`, `prompt_token_ids`, `cache_salt`).
    """
    if isinstance(prompt, TokenizedPrompt):
        check_cache_salt(prompt.cache_salt)
        return prompt
    if not isinstance(prompt, dict):
        return TokenizedPrompt(*_tokenize(tokenizer, prompt))
    salt = prompt.get("cache_salt")
    check_cache_salt(salt)
    if "prompt_token_ids" in prompt:
        token_ids = prompt["prompt_token_ids"]
        if not isinstance(token_ids, list):
            raise ValueError(f"prompt_token_ids: must be a list of token ids, got {token_ids!r}")
        return TokenizedPrompt(prompt.get("prompt"), list(token_ids), salt)
    if "prompt" not in prompt:
        raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
    text, token_ids = _tokenize(tokenizer, prompt["prompt"])
    return TokenizedPrompt(text, token_ids, salt)


def check_cache_salt(cache_salt: object) -> None:
    """A salt is None or a non-empty string; raises ValueError naming `cache_salt`."""
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise ValueError(f"cache_salt: must be a non-empty string, got {cache_salt!r}")


def _tokenize(tokenizer: Any | None, prompt: object) -> tuple[str | None, list[int]]:
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt: must not be empty")
        if tokenizer is None:
            raise ValueError("prompt: this model has no tokenizer; pass prompt_token_ids")
        check_text("prompt", prompt)
        return prompt, list(tokenizer.encode(prompt))
    if isinstance(prompt, list):
        return None, list(prompt)
    raise ValueError(f"prompt: expected str, list of token ids or dict, got {type(prompt)}")
