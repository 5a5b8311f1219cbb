"""Tokenizer loading, prompt encoding and chat templates (all through transformers)."""

from __future__ import annotations

import os
from typing import Any

from jinja2 import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

# Any of these in a folder means it ships a tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
)


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase | None:
    """The tokenizer of an HF folder or a `.gguf` file; None for a folder (or a GGUF) without
    one.

    A model without a tokenizer still runs on `prompt_token_ids`; its output text stays empty.
    """
    path = os.fspath(path)
    if path.endswith(".gguf"):
        if not _gguf_has_tokenizer(path):
            return None
        folder, name = os.path.split(os.path.abspath(path))
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(path)


def _gguf_has_tokenizer(path: str) -> bool:
    import gguf

    return "tokenizer.ggml.tokens" in gguf.GGUFReader(path).fields


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a completion prompt, with the tokenizer's own special tokens (e.g. BOS)."""
    return list(tokenizer.encode(prompt, add_special_tokens=True))


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template.

    The template writes its own special tokens, so the text is encoded without adding more.

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this model's tokenizer has no chat template; use a completion prompt instead"
        )
    for index, message in enumerate(messages):
        if isinstance(message.get("content"), str):
            check_text(f"messages[{index}].content", message["content"])
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except TemplateError as error:  # the template's own raise_exception(...): bad input
        raise ValueError(f"messages: the chat template rejected them: {error}") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


def check_text(field_name: str, text: str) -> None:
    """Text a tokenizer can take: encodable as UTF-8 (a lone UTF-16 surrogate makes the
    tokenizers raise TypeError); raises ValueError naming `field_name`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{field_name}: lone UTF-16 surrogate at character {error.start}; text must be "
            "valid Unicode"
        ) from None
